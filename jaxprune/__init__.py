"""jaxprune: neural-network pruning as pure transforms over JAX parameter pytrees.

The pipeline every method reuses is criteria → allocation → pattern → mask (:mod:`jaxprune.core`);
training-time pruning is an Optax transform (:mod:`jaxprune.training`); post-training pruning with
calibration lives in :mod:`jaxprune.oneshot`, shape-shrinking pruning in :mod:`jaxprune.structured`,
packed formats and Pallas kernels in :mod:`jaxprune.kernels`, checkpoints and sharding in
:mod:`jaxprune.io`. Reference models, data and loops are in :mod:`jaxprune.zoo`, apart from the
library.

>>> import jax.numpy as jnp, jaxprune as jp
>>> pruned, masks = jp.prune({"kernel": jnp.array([[1., -3.], [2., 0.]])}, 0.5)
>>> float(jp.total_sparsity(pruned, masks))
0.5
"""

import importlib as _importlib
from typing import Any as _Any

from jaxprune import training
from jaxprune.core import allocation, criteria, filters, masks, patterns, pipeline, schedules
from jaxprune.core.allocation import ERK, Global, Uniform
from jaxprune.core.allocation import register as register_allocation
from jaxprune.core.criteria import Criterion
from jaxprune.core.criteria import register as register_criterion
from jaxprune.core.masks import (
    apply_masks,
    check_masks,
    init_masks,
    sparsity_stats,
    summary_table,
    total_sparsity,
)
from jaxprune.core.opmap import LeafOp, OperatorMap, operator_map
from jaxprune.core.patterns import NM, Block, Channel, PerLeaf, Unstructured
from jaxprune.core.patterns import register as register_pattern
from jaxprune.core.pipeline import compute_masks, leaf_mask, prune
from jaxprune.core.schedules import Iterative, OneShot, Polynomial
from jaxprune.training import (
    PruneState,
    get_masks,
    get_prune_state,
    gradual_magnitude,
    project,
    pruner,
)

__version__ = "0.1.0"

# method families imported on first use (``jp.oneshot``, ``jp.kernels``...) so ``import jaxprune``
# stays light and never needs the data packages
_LAZY_SUBMODULES = ("core", "io", "kernels", "oneshot", "structured")


def __getattr__(name: str) -> _Any:
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"jaxprune.{name}")
    raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*(n for n in globals() if not n.startswith("_")), *_LAZY_SUBMODULES})


__all__ = [
    "allocation", "criteria", "filters", "masks", "patterns", "pipeline", "schedules", "training",
    "ERK", "Global", "Uniform", "Criterion",
    "register_allocation", "register_criterion", "register_pattern",
    "apply_masks", "check_masks", "init_masks", "sparsity_stats", "summary_table",
    "total_sparsity",
    "NM", "Block", "Channel", "PerLeaf", "Unstructured",
    "compute_masks", "leaf_mask", "prune", "operator_map", "OperatorMap", "LeafOp",
    "Iterative", "OneShot", "Polynomial",
    "PruneState", "get_masks", "get_prune_state", "gradual_magnitude", "project", "pruner",
]
