"""Dynamic sparse training (static sparse, SET, RigL) as Optax transforms wrapping any optimizer.

The network is sparse from the first step and stays at *exactly* the same density: the mask is drawn
at init (random positions, per-leaf density from an allocation, ERK by default) and, for SET and
RigL, every ``update_period`` steps a fraction of the active weights with the smallest magnitude is
dropped and the same number of inactive weights is regrown — at random (SET, Mocanu et al. 2018)
or where the dense gradient is largest (RigL, Evci et al. 2020). The drop fraction is annealed by
a cosine from ``drop_fraction`` to 0 at ``end_step`` (default 75% of ``total_steps``).

Behaviour, per step (everything inside one jitted update; mask updates are a ``lax.cond`` so
non-update steps do not recompile and add only one fused select to the inner update; a training
loop that knows the schedule can say so with ``tx.update(..., mask_update=i % update_period == 0)``
as a static argument, and the steps without an update then compile without the cond and cost what
a static-sparse step costs — see :func:`jaxprune.training.wrapper.masked`):

1. The inner optimizer receives the gradients *masked* (``g * m``), like RigL's masked-weight
   parametrisation, so inactive weights accumulate no optimizer state.
2. On update steps the masks are recomputed from the post-step params (drop by ``|w|``) and the raw
   dense gradients (RigL growth); regrown weights start at exactly ``0.0`` and their inner optimizer
   state (momenta, second moments, ...) is zeroed with :func:`optax.tree_utils.tree_map_params`, so
   any optax optimizer works (``sgd``, ``adam``, ``adamw``, ``lion``, ``chain``,
   ``inject_hyperparams``, ...).
3. The returned updates go through :func:`jaxprune.training.project`, so after
   ``optax.apply_updates`` the params are exactly zero off-mask — on the very first step too.

All three are built on the shared wrapper skeleton (:func:`jaxprune.training.wrapper.masked`);
the state is :class:`jaxprune.training.PruneState` (``count``, ``masks``, ``inner_state``,
``movement=None``), so :func:`jaxprune.training.get_masks` finds the masks.

Example:
    >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
    >>> from jaxprune.training.dst import rigl
    >>> params = {"a": {"kernel": jnp.ones((16, 8))}, "b": {"kernel": jnp.ones((8, 4))}}
    >>> tx = rigl(optax.adam(1e-2), 0.75, total_steps=400, update_period=10)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> round(jp.total_sparsity(params, jp.get_masks(state)), 2)
    0.75
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core import allocation as alloc_lib
from jaxprune.core import criteria as crit_lib
from jaxprune.core.allocation import check_sparsity
from jaxprune.core.masks import (
    Filter,
    PyTree,
    apply_masks,
    check_masks,
    init_masks,
    leaves_with_paths,
    tree_map_masked,
    tree_map_with_path_masked,
)
from jaxprune.core.pipeline import check_opmap, compute_masks, default_filter, leaf_masks
from jaxprune.core.topk import count_true
from jaxprune.training.wrapper import (
    MaskUpdate,
    get_masks,
    masked,
    reset_inner_state,
    selected_masks,
)

__all__ = [
    "SPARSE_TRAINING_METHODS",
    "sparse_training",
    "static_sparse",
    "set_training",
    "rigl",
    "cosine_drop_fraction",
    "drop_grow",
    "reset_inner_state",
    "sparse_init",
    "mask_params",
]

SPARSE_TRAINING_METHODS = ("static", "set", "rigl")


def cosine_drop_fraction(step: Any, drop_fraction: float, end_step: int) -> jax.Array:
    """RigL's annealed drop fraction ``f/2 · (1 + cos(π t / T_end))``, and 0 from ``end_step`` on.

    >>> [round(float(cosine_drop_fraction(t, 0.3, 100)), 4) for t in (0, 50, 100)]
    [0.3, 0.15, 0.0]
    """
    t = jnp.asarray(step, jnp.float32)
    f = 0.5 * drop_fraction * (1.0 + jnp.cos(jnp.pi * jnp.clip(t / end_step, 0.0, 1.0)))
    return jnp.where(t < end_step, f, 0.0).astype(jnp.float32)


def drop_grow(
    masks: PyTree, params: PyTree, grow_scores: PyTree, drop_fraction: Any
) -> tuple[PyTree, PyTree]:
    """One SET/RigL mask update: ``(new_masks, grown)``; density per leaf is unchanged exactly.

    Per pruned leaf with ``n`` active entries, ``k = round(drop_fraction · n)`` active entries with
    the smallest ``|w|`` are dropped, then the ``k`` entries with the highest ``grow_scores`` among
    the rest (just-dropped ones included, as in RigL) are grown. Both selections are
    :func:`jaxprune.core.pipeline.leaf_masks` with exact ``n_keep`` and ``keep_pruned`` (ties go to
    the lower flat index). ``grown`` marks entries active now but not before.

    All leaves are selected together (one drop and one grow selection, whatever their number and
    sizes), so the update's program — the taken branch of the wrapper's ``lax.cond`` — stays small:
    on XLA:CPU a step *without* an update pays per run for every reduction that branch contains.

    >>> m = {"w": jnp.array([True, True, False, False])}
    >>> p = {"w": jnp.array([3., 1., 0., 0.])}
    >>> new, grown = drop_grow(m, p, {"w": jnp.array([0., 0., 5., 1.])}, 0.5)
    >>> new["w"], grown["w"]
    (Array([ True, False,  True, False], dtype=bool), Array([False, False,  True, False], dtype=bool))
    """
    frac = jnp.asarray(drop_fraction, jnp.float32)
    flat: list[tuple[str, Any, Any, Any]] = []
    # tree_map checks that the three trees have one structure (a zip of leaf lists would not)
    tree_map_with_path_masked(
        lambda path, m, p, s: None if m is None else flat.append((path, m, p, s)),
        masks, params, grow_scores)
    out: dict[str, tuple[jax.Array, jax.Array]] = {}
    if flat:
        paths = [r[0] for r in flat]
        old = [jnp.asarray(r[1], bool) for r in flat]
        n_active = count_true(old)  # all leaves in one reduction
        k = jnp.round(frac * n_active.astype(jnp.float32)).astype(jnp.int32)
        # drop: keep the n_active - k largest |w| among the active entries
        kept = leaf_masks([jnp.abs(r[2]).astype(jnp.float32) for r in flat],
                          [n_active[i] - k[i] for i in range(len(flat))], keep_pruned=old,
                          paths=paths)
        # grow: the k highest grow scores among the rest (just-dropped entries included)
        grown = leaf_masks([jnp.asarray(r[3]).astype(jnp.float32) for r in flat],
                           [k[i] for i in range(len(flat))], keep_pruned=[~m for m in kept],
                           paths=paths)
        for i, path in enumerate(paths):
            out[path] = (kept[i] | grown[i], grown[i] & ~old[i])
    new_masks = tree_map_with_path_masked(lambda path, m: None if m is None else out[path][0], masks)
    grown = tree_map_with_path_masked(lambda path, m: None if m is None else out[path][1], masks)
    return new_masks, grown


def sparse_init(
    params: PyTree,
    sparsity: float,
    *,
    allocation: alloc_lib.Allocation | str = "erk",
    filter: Filter | None = None,
    key: jax.Array | None = None,
    opmap: Any = None,
) -> PyTree:
    """Random masks at ``sparsity`` with per-leaf densities from ``allocation`` (ERK by default).

    Scores come from :data:`jaxprune.core.criteria.random` and go through
    :func:`jaxprune.core.pipeline.compute_masks`, so each leaf has exactly its allocated count.

    >>> m = sparse_init({"kernel": jnp.ones((10, 10))}, 0.9, key=jax.random.key(0))
    >>> int(m["kernel"].sum())
    10
    """
    check_sparsity("<sparse_init sparsity>", sparsity)
    key = jax.random.key(0) if key is None else key
    check_opmap(opmap)
    masks = init_masks(params, default_filter(opmap) if filter is None else filter)
    scores = crit_lib.random(params, masks, key=key)
    return compute_masks(masks, scores, sparsity, allocation, "unstructured", opmap=opmap)


def mask_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
    """``params`` zeroed off the masks held in ``opt_state`` (to start the forward pass sparse).

    >>> tx = static_sparse(optax.sgd(0.1), 0.5, filter=lambda p, x: True)
    >>> p = {"w": jnp.arange(1., 5.)}
    >>> int((mask_params(p, tx.init(p))["w"] == 0).sum())
    2
    """
    return apply_masks(params, get_masks(opt_state))


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, jax.core.Tracer):
        raise ValueError(f"jaxprune: {name} must be a positive Python int known when the "
                         f"transform is built (static), got a traced value {v!r}")
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer) or v <= 0:
        raise ValueError(f"jaxprune: {name} must be a positive int, got {v!r}")
    return int(v)


def sparse_training(
    inner: optax.GradientTransformation | None = None,
    sparsity: float | None = None,
    *,
    method: str = "rigl",
    masks: PyTree | None = None,
    allocation: alloc_lib.Allocation | str = "erk",
    filter: Filter | None = None,
    drop_fraction: float = 0.3,
    update_period: int = 100,
    end_step: int | None = None,
    total_steps: int | None = None,
    key: jax.Array | None = None,
    opmap: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner`` so training is sparse from step 0 with ``method`` in ``static|set|rigl``.

    Args:
      inner: any optax optimizer (``None``: identity).
      sparsity: global target in ``[0, 1)``; required unless ``masks`` is given (not both).
      method: ``"static"`` (mask fixed), ``"set"`` (random regrowth) or ``"rigl"`` (regrowth by
        dense-gradient magnitude).
      masks: explicit initial masks (bool leaves / ``None``) instead of a random draw; they must
        mirror the params (checked at init).
      allocation: per-leaf density of the random initial mask (``"erk"`` default, ``"uniform"``).
      filter: which leaves are sparse (default: ``kernel`` leaves with ndim >= 2).
      drop_fraction: initial drop fraction in ``(0, 1)``, cosine-annealed to 0 at ``end_step``.
      update_period: steps between mask updates (``ΔT``), ``> 0``.
      end_step: last step with mask updates (default ``0.75 * total_steps``).
      total_steps: training length, used for the default ``end_step``.
      key: PRNG key for the initial mask and SET regrowth (default ``jax.random.key(0)``).
      opmap: the model's operator map (:func:`jaxprune.operator_map`): the default filter takes
        its matmul/conv weights and ERK uses their true fan-in and fan-out.

    Mask updates happen at ``count`` values ``ΔT, 2ΔT, ...`` below ``end_step`` (``count`` = the
    number of updates already applied).

    >>> tx = sparse_training(optax.sgd(0.1, momentum=0.9), 0.9, method="set", total_steps=1000)
    """
    if method not in SPARSE_TRAINING_METHODS:
        raise ValueError(
            f"jaxprune: unknown sparse-training method '{method}'; valid: {SPARSE_TRAINING_METHODS}"
        )
    if masks is None and sparsity is None:
        raise ValueError(
            f"jaxprune: {method} needs a sparsity (sparse_training/static_sparse: or masks=)"
        )
    if masks is not None and sparsity is not None:
        raise ValueError(
            f"jaxprune: {method}: pass sparsity or masks=, not both (given masks keep their own "
            f"sparsity, so sparsity={sparsity!r} would be ignored)"
        )
    if sparsity is not None:
        if isinstance(sparsity, str):
            raise ValueError(f"jaxprune: {method} sparsity must be a float, got {sparsity!r}")
        check_sparsity(f"<{method} sparsity>", sparsity)
    alloc = alloc_lib.get(allocation)
    check_opmap(opmap)
    dynamic = method != "static"
    if dynamic:
        if isinstance(drop_fraction, jax.core.Tracer):
            raise ValueError("jaxprune: drop_fraction must be a Python float known when the "
                             "transform is built (static), got a traced value")
        if np.ndim(drop_fraction) == 0 and isinstance(drop_fraction, np.generic | jax.Array) \
                and np.issubdtype(np.asarray(drop_fraction).dtype, np.floating):
            drop_fraction = float(drop_fraction)  # a NumPy / JAX scalar, as a Python float
        if isinstance(drop_fraction, bool) or not (
                isinstance(drop_fraction, int | float) and 0.0 < drop_fraction < 1.0):
            raise ValueError(
                f"jaxprune: drop_fraction must be in (0, 1) (a float), got {drop_fraction!r}"
            )
        update_period = _check_positive_int("update_period", update_period)
        if end_step is None:
            if total_steps is None:
                raise ValueError(
                    f"jaxprune: {method} needs total_steps= (end_step defaults to 75% of it) "
                    "or an explicit end_step="
                )
            end_step = int(0.75 * _check_positive_int("total_steps", total_steps))
        end_step = _check_positive_int("end_step", end_step)
    key = jax.random.key(0) if key is None else key

    def init_dst_masks(params: PyTree) -> PyTree:
        if masks is not None:
            check_masks(params, masks)
            m0 = tree_map_masked(lambda m: None if m is None else jnp.asarray(m, bool), masks)
        else:
            selected_masks(method, params, filter, "unstructured", opmap)
            m0 = sparse_init(params, sparsity, allocation=alloc, filter=filter, key=key, opmap=opmap)
        for path, m in leaves_with_paths(m0):
            if m is None or not m.size or not dynamic or isinstance(m, jax.core.Tracer):
                continue  # under jit (e.g. sharded init) the check cannot run; eager init checks
            if not bool(jnp.any(m)):
                raise ValueError(
                    f"jaxprune: initial mask of '{path}' is empty; {method} cannot regrow a leaf "
                    "with no active weights (lower the sparsity or use allocation='erk')"
                )
        return m0

    if not dynamic:
        return masked(inner, method="static_sparse", init_masks=init_dst_masks, mask_grads=True)

    def should_update(count: jax.Array) -> jax.Array:
        return (count > 0) & (count % update_period == 0) & (count < end_step)

    def update_masks(u: MaskUpdate) -> tuple[PyTree, PyTree]:
        if method == "rigl":
            scores = tree_map_masked(
                lambda m, g: None if m is None else jnp.abs(g).astype(jnp.float32), u.masks, u.grads
            )
        else:
            scores = crit_lib.random(u.grads, u.masks, key=jax.random.fold_in(key, u.count))
        frac = cosine_drop_fraction(u.count, drop_fraction, end_step)
        return drop_grow(u.masks, u.new_params, scores, frac)

    return masked(inner, method={"set": "set_training"}.get(method, method),
                  init_masks=init_dst_masks, update_masks=update_masks,
                  should_update=should_update, mask_grads=True, restart_grown=True)


def static_sparse(
    inner: optax.GradientTransformation | None = None,
    sparsity: float | None = None,
    *,
    masks: PyTree | None = None,
    allocation: alloc_lib.Allocation | str = "erk",
    filter: Filter | None = None,
    key: jax.Array | None = None,
    opmap: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Static sparse training: a random (ERK by default, or uniform) or given mask, fixed for all
    of training.

    >>> tx = static_sparse(optax.adam(1e-3), 0.9)
    >>> tx = static_sparse(optax.adam(1e-3), masks={"w": jnp.array([True, False])})
    """
    return sparse_training(
        inner, sparsity, method="static", masks=masks, allocation=allocation, filter=filter,
        key=key, opmap=opmap,
    )


def set_training(
    inner: optax.GradientTransformation | None = None,
    sparsity: float | None = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """SET (Mocanu et al. 2018): drop the smallest-magnitude weights, regrow at random.

    ``kwargs`` are :func:`sparse_training`'s (``allocation=``, ``filter=``, ``drop_fraction=``,
    ``update_period=``, ``end_step=``, ``total_steps=``, ``key=``, ``opmap=``).

    >>> tx = set_training(optax.sgd(0.1), 0.8, total_steps=2000)
    """
    return sparse_training(inner, sparsity, method="set", **kwargs)


def rigl(
    inner: optax.GradientTransformation | None = None,
    sparsity: float | None = None,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """RigL (Evci et al. 2020): drop smallest magnitude, regrow where the dense ``|grad|`` is largest.

    Defaults follow the paper: ERK initial distribution, drop fraction 0.3 cosine-annealed until
    75% of ``total_steps``, ``ΔT = 100``; regrown weights and their optimizer state start at zero.
    ``kwargs`` are :func:`sparse_training`'s.

    >>> tx = rigl(optax.adamw(1e-3), 0.9, total_steps=10_000)
    """
    return sparse_training(inner, sparsity, method="rigl", **kwargs)
