"""Structured pruning that shrinks shapes: dependency groups discovered from the model's jaxpr,
group importance (L1/L2, Taylor, Wanda, FLAP), slimming to a smaller dense model, FLAP bias
compensation, and layer (block) dropping. Groups are found by a generic jaxpr walker
(:mod:`~jaxprune.core.walker`) running per-primitive rules (:mod:`~jaxprune.structured.rules`).

>>> import jax, jax.numpy as jnp, numpy as np
>>> from jaxprune import structured as st
>>> p = {"w1": jnp.ones((3, 5)), "w2": jnp.ones((5, 2))}
>>> gs = st.discover_groups(lambda p, x: (x @ p["w1"]) @ p["w2"], p, jnp.ones((1, 3)))
>>> sel = st.choose_units(st.group_scores(p, gs, "l2"), gs, 0.4)
>>> st.slim(p, gs, sel.keep)["w1"].shape
(3, 3)
"""

from jaxprune.structured.groups import (
    Group,
    Member,
    TraceError,
    declare_groups,
    discover_groups,
    param_shapes,
)
from jaxprune.structured.importance import Selection, choose_units, group_scores, input_stats
from jaxprune.structured.layers import BlockScore, block_scores, choose_blocks, drop_blocks
from jaxprune.structured.slimming import (
    axis_keep_masks,
    compensate_bias,
    group_masks,
    param_count,
    slim,
    slim_nnx,
)

__all__ = [
    "Group", "Member", "TraceError", "declare_groups", "discover_groups", "param_shapes",
    "Selection", "group_scores", "input_stats", "choose_units",
    "BlockScore", "block_scores", "choose_blocks", "drop_blocks",
    "axis_keep_masks", "compensate_bias", "group_masks", "param_count", "slim",
    "slim_nnx",
]
