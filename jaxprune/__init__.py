"""jaxprune: neural-network pruning as pure transforms over JAX parameter pytrees.

The pipeline every method reuses is criteria → allocation → pattern → mask
(:mod:`jaxprune.criteria`, :mod:`jaxprune.allocation`, :mod:`jaxprune.patterns`,
:mod:`jaxprune.masks`); training-time pruning is an Optax transform (:func:`pruner`).

>>> import jax.numpy as jnp, jaxprune as jp
>>> pruned, masks = jp.prune({"kernel": jnp.array([[1., -3.], [2., 0.]])}, 0.5)
>>> float(jp.total_sparsity(pruned, masks))
0.5
"""

import importlib
from typing import Any

from jaxprune import allocation, criteria, masks, patterns, pipeline, schedules, training
from jaxprune.allocation import ERK, Global, Uniform
from jaxprune.criteria import Criterion
from jaxprune.masks import (
    apply_masks,
    check_masks,
    init_masks,
    select,
    sparsity_stats,
    summary_table,
    total_sparsity,
)
from jaxprune.patterns import NM, Block, Channel, PerLeaf, Unstructured
from jaxprune.pipeline import compute_masks, prune
from jaxprune.schedules import Iterative, OneShot, Polynomial
from jaxprune.training import (
    PruneState,
    get_masks,
    get_prune_state,
    gradual_magnitude,
    project,
    pruner,
)

__version__ = "0.1.0"

# method families and tools, imported on first use (``jp.oneshot.sparsegpt``, ``jp.kernels``...)
# so ``import jaxprune`` stays light and never needs the data packages
_LAZY_SUBMODULES = (
    "checkpoint", "data", "kernels", "loops", "lottery", "models", "oneshot", "pai", "sharding",
    "sparse_ckpt", "sparse_training", "ste", "structured",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"jaxprune.{name}")
    raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY_SUBMODULES])

__all__ = [
    "allocation", "criteria", "masks", "patterns", "pipeline", "schedules", "training",
    "ERK", "Global", "Uniform", "Criterion",
    "apply_masks", "check_masks", "init_masks", "select", "sparsity_stats", "summary_table",
    "total_sparsity",
    "NM", "Block", "Channel", "PerLeaf", "Unstructured",
    "compute_masks", "prune",
    "Iterative", "OneShot", "Polynomial",
    "PruneState", "get_masks", "get_prune_state", "gradual_magnitude", "project", "pruner",
]
