"""Post-training (one-shot) pruning with calibration.

Observe, then transform: :func:`calibrate` records per-layer input statistics of any Flax model;
layer methods ``(weight, stats, target) -> (new_weight, mask)`` — :func:`sparsegpt`, :func:`obs`,
:func:`wanda`, :func:`magnitude`, :func:`dsnot` — prune one kernel; :func:`prune_sequential` walks
a model block by block; :func:`owl_targets` gives outlier-aware per-layer sparsities.

>>> import jax, jax.numpy as jnp
>>> from flax import linen as nn
>>> from jaxprune import oneshot
>>> m = nn.Dense(4); p = m.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
>>> st = oneshot.calibrate(m, p, [jax.random.normal(jax.random.key(1), (32, 8))])
>>> w, mask = oneshot.sparsegpt(p["kernel"], st["kernel"], 0.5)
>>> float(1 - mask.mean())
0.5
"""

from jaxprune.oneshot.calibration import LayerStats, as_matrix, calibrate, layer_inputs
from jaxprune.oneshot.common import parse_target, recon_error
from jaxprune.oneshot.dsnot import dsnot, with_dsnot
from jaxprune.oneshot.obs import obs
from jaxprune.oneshot.owl import OWL, owl_targets
from jaxprune.oneshot.sequential import (
    METHODS,
    BlockSpec,
    get_method,
    prune_layers,
    prune_sequential,
)
from jaxprune.oneshot.sparsegpt import sparsegpt
from jaxprune.oneshot.wanda import PerOutput, magnitude, wanda

__all__ = [
    "LayerStats", "as_matrix", "calibrate", "layer_inputs", "parse_target", "recon_error",
    "dsnot", "with_dsnot", "obs", "OWL", "owl_targets", "METHODS", "BlockSpec", "get_method",
    "prune_layers", "prune_sequential", "sparsegpt", "PerOutput", "magnitude", "wanda",
]
