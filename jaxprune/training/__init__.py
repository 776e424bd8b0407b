"""Training-time pruning: Optax transforms that keep params exactly sparse on every step.

* :func:`pruner` / :func:`gradual_magnitude` — prune by a schedule inside any optax optimizer.
* :func:`sparse_training` (:func:`static_sparse`, :func:`set_training`, :func:`rigl`) — dynamic
  sparse training at a fixed density.
* :func:`ste_params`, :func:`sr_ste` — straight-through estimator / SR-STE for N:M.
* lottery tickets (:func:`imp`, :func:`keep_rewind_point`) and pruning at initialisation
  (:func:`snip`, :func:`grasp`, :func:`synflow`).

All of them share one Optax wrapper skeleton (:mod:`jaxprune.training.wrapper`) and build
every mask through :mod:`jaxprune.core.pipeline`.

>>> import optax, jaxprune as jp
>>> tx = jp.training.rigl(optax.adam(1e-3), sparsity=0.9, total_steps=1000)
"""

from jaxprune.training.dst import (
    cosine_drop_fraction,
    drop_grow,
    reset_inner_state,
    rigl,
    set_training,
    sparse_init,
    sparse_training,
    static_sparse,
)
from jaxprune.training.lottery import (
    LotteryResult,
    Round,
    Trained,
    get_rewind_point,
    get_rewind_state,
    imp,
    imp_masks,
    imp_sparsity,
    keep_rewind_point,
    rewind,
)
from jaxprune.training.pai import (
    collapsed_layers,
    grasp,
    grasp_scores,
    snip,
    snip_scores,
    synflow,
    synflow_scores,
)
from jaxprune.training.pruning import gradual_magnitude, pruner
from jaxprune.training.ste import sparse_params, sr_ste, ste_masks, ste_params
from jaxprune.training.wrapper import PruneState, get_masks, get_prune_state, project

__all__ = [
    "PruneState", "get_masks", "get_prune_state", "project", "pruner", "gradual_magnitude",
    "sparse_training", "static_sparse", "set_training", "rigl", "cosine_drop_fraction",
    "drop_grow", "reset_inner_state", "sparse_init",
    "ste_masks", "ste_params", "sparse_params", "sr_ste",
    "keep_rewind_point", "get_rewind_state", "get_rewind_point", "imp_sparsity", "imp_masks",
    "rewind", "Trained", "Round", "LotteryResult", "imp",
    "snip_scores", "grasp_scores", "synflow_scores", "snip", "grasp", "synflow",
    "collapsed_layers",
]
