"""Training-time pruning as an Optax transform that keeps params exactly sparse.

:func:`pruner` wraps any optax optimizer. Its update returns ``u' = m * (p + u) - p`` on pruned
leaves, so after ``optax.apply_updates`` the params are exactly ``0.0`` wherever the mask is off, on
every step, with no extra call to remember (JaxPruner's ``post_gradient_update`` footgun). Masks,
the step counter and accumulated signals live in :class:`PruneState`.

Example:
    >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
    >>> params = {"dense": {"kernel": jnp.arange(1., 9.).reshape(4, 2), "bias": jnp.zeros(2)}}
    >>> tx = jp.pruner(optax.sgd(0.1), schedule=jp.schedules.OneShot(0.5, step=0))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int((params["dense"]["kernel"] == 0).sum())
    4
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune.core import allocation as alloc_lib
from jaxprune.core import criteria as crit_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core import schedules as sched_lib
from jaxprune.core.masks import Filter, PyTree, tree_map_masked
from jaxprune.core.pipeline import (
    check_opmap,
    compute_masks,
    resolve_sparsity,
)
from jaxprune.training.wrapper import MaskUpdate, check_inner, masked, selected_masks

__all__ = ["pruner", "gradual_magnitude"]


def pruner(
    inner: optax.GradientTransformation | None = None,
    *,
    schedule: sched_lib.Schedule,
    criterion: crit_lib.Criterion | str = "magnitude",
    allocation: alloc_lib.Allocation | str = "uniform",
    pattern: pat_lib.Pattern | str = "unstructured",
    filter: Filter | None = None,
    key: jax.Array | None = None,
    opmap: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` (any optax optimizer) so training prunes by ``schedule`` and stays sparse.

    At steps where ``schedule.should_update(count)`` the masks are recomputed from the post-step
    params through the shared pipeline (criterion → allocation → pattern); on other steps the
    masks are reused (a ``lax.cond``, so nothing recompiles, and such a step adds only one fused
    select to the inner update). Criteria that need gradients see the raw gradients given to this
    transform, so wrap the optimizer rather than chaining after it.

    Args:
      inner: the optimizer to wrap (``None``: identity, for use as the last element of a chain).
      schedule: when and how much to prune (:mod:`jaxprune.core.schedules`); its final sparsity
        must be reachable by ``pattern`` (checked here).
      criterion, allocation, pattern: the pipeline pieces (objects or names).
      filter: which leaves to prune (default: the matmul/conv weights of ``opmap``; without one,
        ``kernel`` leaves with ndim >= 2).
      key: PRNG key for the ``random`` criterion.
      opmap: the model's operator map (:func:`jaxprune.operator_map`): N:M groups and blocks act
        on each leaf's true matrix view and ERK uses true fan-in/fan-out.

    >>> tx = pruner(optax.adam(1e-3), schedule=sched_lib.Polynomial(0.9, 0, 1000, freq=100))
    """
    if not isinstance(schedule, sched_lib.Schedule):
        raise TypeError(
            f"jaxprune: pruner schedule= must be a jaxprune Schedule (OneShot, Polynomial, "
            f"Iterative), got {type(schedule).__name__}: {schedule!r}"
        )
    check_inner("pruner", inner)
    crit = crit_lib.get(criterion)
    alloc = alloc_lib.get(allocation)
    if not alloc.traceable:
        raise ValueError(
            f"jaxprune: allocation {type(alloc).__name__} needs concrete values and cannot run "
            "inside a jitted training step; use it with jaxprune.prune / compute_masks"
        )
    pat = pat_lib.parse(pattern)
    resolve_sparsity(schedule.final_sparsity(), pat)
    check_opmap(opmap)
    if "key" in crit.needs and key is None:
        raise ValueError(f"jaxprune: criterion '{crit.name}' needs key=; pass a PRNG key")
    for s in crit.needs:
        if s not in ("grads", "key", "movement"):
            raise ValueError(
                f"jaxprune: criterion '{crit.name}' needs '{s}', which training cannot supply; "
                "use jaxprune.prune with the signal instead"
            )

    def init_pruner_masks(params: PyTree) -> PyTree:
        return selected_masks("pruner", params, filter, pat, opmap)

    def update_masks(u: MaskUpdate) -> PyTree:
        signals: dict[str, Any] = {}
        if "grads" in crit.needs:
            signals["grads"] = u.grads
        if "key" in crit.needs:
            signals["key"] = jax.random.fold_in(key, u.count)
        if "movement" in crit.needs:
            signals["movement"] = u.aux
        scores = crit(u.new_params, u.masks, **signals)
        return compute_masks(u.masks, scores, schedule.sparsity_at(u.count), alloc, pat, opmap=opmap)

    movement: dict[str, Any] = {}
    if "movement" in crit.needs:
        movement = {
            "init_aux": lambda masks, params: tree_map_masked(
                lambda m, p: None if m is None else jnp.zeros(p.shape, jnp.float32), masks, params),
            "update_aux": lambda acc, grads, params: tree_map_masked(
                lambda a, g, p: None if a is None else a - (g * p).astype(jnp.float32),
                acc, grads, params),
        }
    return masked(inner, method="pruner", init_masks=init_pruner_masks, update_masks=update_masks,
                  should_update=schedule.should_update, **movement)


def gradual_magnitude(
    inner: optax.GradientTransformation | None,
    sparsity: float,
    begin: int,
    end: int,
    freq: int = 100,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """Zhu & Gupta gradual magnitude pruning: ``pruner`` with a :class:`Polynomial` schedule to
    ``sparsity`` (``kwargs``: ``criterion=``, ``allocation=``, ``pattern=``, ``filter=``, ``key=``,
    ``opmap=``).

    >>> tx = gradual_magnitude(optax.adam(1e-3), 0.9, begin=100, end=1000, freq=50)
    >>> gradual_magnitude(optax.adam(1e-3), 0.9, begin=0, end=10, pattern="2:4")
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: sparsity 0.9 is above what pattern 2:4 can reach (0.5)
    """
    if isinstance(sparsity, str):
        raise ValueError(
            f"jaxprune: gradual_magnitude sparsity must be a float, got {sparsity!r}"
        )
    return pruner(
        inner,
        schedule=sched_lib.Polynomial(sparsity, begin, end, freq),
        criterion=kwargs.pop("criterion", "magnitude"),
        **kwargs,
    )
