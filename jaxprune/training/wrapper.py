"""The one Optax wrapper skeleton shared by every training-time method.

:func:`wrap` is the skeleton: it wraps an inner optax optimizer (``optax.with_extra_args_support``),
keeps the step ``count`` (``optax.safe_int32_increment``), raises the one "needs params" error
naming the method, and leaves a method only its own logic. :func:`masked` builds on it for the
methods that hold masks (:func:`jaxprune.training.pruner`, static sparse / SET / RigL): a method
supplies ``init_masks`` and ``update_masks``; the skeleton runs ``update_masks`` in the taken branch
of one ``lax.cond`` and projects the updates so ``optax.apply_updates`` leaves params exactly zero
where a mask is off. A step that does not update masks costs one fused select over the params
plus the cond; told so by the caller (``tx.update(..., mask_update=False)``), nothing more than a
static-sparse step.

>>> import jax.numpy as jnp
>>> project({"w": jnp.array([1., 1.])}, {"w": jnp.array([2., 3.])}, {"w": jnp.array([True, False])})
{'w': Array([ 1., -3.], dtype=float32)}
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core import patterns as pat_lib
from jaxprune.core._leafcheck import check_opmap_paths
from jaxprune.core.masks import PyTree, apply_masks, init_masks, leaves_with_paths, tree_map_masked
from jaxprune.core.pipeline import check_opmap, default_filter, validate_patterns

__all__ = [
    "PruneState", "InnerStep", "MaskUpdate", "wrap", "masked", "reset_inner_state", "project",
    "find_state", "get_prune_state", "get_masks", "check_inner", "check_selection",
    "selected_masks",
]

S = TypeVar("S", bound=tuple)


class PruneState(NamedTuple):
    """State of every mask-holding wrapper: step ``count``, ``masks``, the wrapped optimizer's
    state and the accumulated movement score (``None`` unless the criterion needs it)."""

    count: jax.Array
    masks: PyTree
    inner_state: optax.OptState
    movement: PyTree | None


class InnerStep(NamedTuple):
    """What a method's update sees: the raw ``grads``, the ``params``, the previous ``state``,
    ``inner(grads) -> (updates, inner_state)`` (the wrapped optimizer's update from that state)
    and the caller's ``mask_update`` hint (``None``, ``True`` or ``False``; see :func:`masked`)."""

    grads: PyTree
    params: PyTree
    state: Any
    inner: Callable[[PyTree], tuple[PyTree, optax.OptState]]
    mask_update: bool | None = None


def _check_hint(method: str, hint: Any) -> bool | None:
    if hint is None or isinstance(hint, bool):
        return hint
    if isinstance(hint, np.bool_):
        return bool(hint)
    what = "a traced value" if isinstance(hint, jax.core.Tracer) else repr(hint)
    raise ValueError(
        f"jaxprune: {method}: mask_update= must be None, True or False (a Python bool the host "
        f"knows, e.g. jax.jit(step, static_argnames='mask_update')), got {what}"
    )


def check_inner(method: str, inner: Any) -> None:
    """Refuse an ``inner`` that is not an optax optimizer (an object with ``init``/``update``)."""
    if inner is not None and not (callable(getattr(inner, "init", None))
                                  and callable(getattr(inner, "update", None))):
        raise TypeError(
            f"jaxprune: {method} inner must be an optax optimizer with init/update (e.g. "
            f"optax.adam(1e-3)) or None, got {type(inner).__name__}: {inner!r}"
        )


def check_selection(method: str, masks: PyTree, opmap: Any, filter: Any) -> None:
    """At init: the pruned leaves must be in ``opmap`` (traced from the same params tree), and
    a default selection that picks no leaf is warned about (training would stay dense).

    >>> check_selection("demo", {"w": jnp.ones(2, bool)}, None, None)
    """
    check_opmap_paths(masks, opmap, filter, method)
    selected = [p for p, m in leaves_with_paths(masks) if m is not None]
    if not selected and filter is None:
        warnings.warn(
            f"jaxprune: {method}: the default filter (leaves named 'kernel' with ndim >= 2, or "
            "the operator map's weights) selected no leaf, so training stays dense; pass "
            "opmap=jp.operator_map(apply_fn, params, x) or a filter=", UserWarning, stacklevel=3)


def selected_masks(method: str, params: PyTree, filter: Any, pattern: Any = "unstructured",
                   opmap: Any = None) -> PyTree:
    """All-true masks of the leaves a method prunes — ``filter``, by default the operator map's
    weights (or ``kernel`` leaves with ndim >= 2) — checked once for every family: the operator
    map (:func:`check_selection`) and ``pattern`` on each leaf's matrix view.

    >>> selected_masks("demo", {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}, None, "2:4")
    {'bias': None, 'kernel': Array([[ True,  True],
           [ True,  True],
           [ True,  True],
           [ True,  True]], dtype=bool)}
    """
    check_opmap(opmap)
    masks = init_masks(params, default_filter(opmap) if filter is None else filter)
    check_selection(method, masks, opmap, filter)
    validate_patterns(masks, pat_lib.parse(pattern), opmap)
    return masks


def _check_same_tree(method: str, grads: PyTree, params: PyTree) -> None:
    gp = [p for p, _ in leaves_with_paths(grads)]
    pp = [p for p, _ in leaves_with_paths(params)]
    if gp != pp:
        only_g = [p for p in gp if p not in pp]
        only_p = [p for p in pp if p not in gp]
        what = (f"'{only_g[0]}' is only in the grads" if only_g else
                f"'{only_p[0]}' is only in the params" if only_p else "their leaves are in another order")
        raise ValueError(
            f"jaxprune: {method}: the grads tree does not match the params tree ({what}); call "
            "tx.update(grads, state, params) with grads of the same params"
        )


def wrap(
    inner: optax.GradientTransformation | None,
    *,
    method: str,
    state_type: type[S],
    init: Callable[[PyTree], dict[str, Any]],
    update: Callable[[InnerStep], tuple[PyTree, dict[str, Any], optax.OptState]],
) -> optax.GradientTransformationExtraArgs:
    """The skeleton: ``state_type`` (a NamedTuple with ``count`` and ``inner_state`` fields) holds
    the counter and the inner state; ``init(params)`` gives the method's other fields and
    ``update(step) -> (updates, fields, inner_state)`` its step (``fields`` may set ``count``;
    by default it advances by one). The keyword ``mask_update`` of ``tx.update`` is taken here
    (checked, given to the method as ``step.mask_update``), not passed to ``inner``.

    >>> class Count(NamedTuple):
    ...     count: jax.Array
    ...     inner_state: optax.OptState
    >>> def update(step):
    ...     updates, inner_state = step.inner(step.grads)
    ...     return updates, {}, inner_state
    >>> tx = wrap(optax.sgd(1.0), method="demo", state_type=Count, init=lambda p: {}, update=update)
    >>> u, st = tx.update({"w": jnp.ones(1)}, tx.init({"w": jnp.zeros(1)}), {"w": jnp.zeros(1)})
    >>> int(st.count), u["w"]
    (1, Array([-1.], dtype=float32))
    """
    check_inner(method, inner)
    inner = optax.with_extra_args_support(optax.identity() if inner is None else inner)

    def init_fn(params: PyTree) -> S:
        return state_type(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params),
                          **init(params))

    def update_fn(updates: PyTree, state: S, params: PyTree | None = None, *,
                  mask_update: bool | None = None, **extra: Any):
        if params is None:
            raise ValueError(
                f"jaxprune: {method} needs params: call tx.update(grads, state, params)"
            )
        _check_same_tree(method, updates, params)
        step = InnerStep(updates, params, state,
                         lambda g: inner.update(g, state.inner_state, params, **extra),
                         _check_hint(method, mask_update))
        new_updates, fields, inner_state = update(step)
        fields.setdefault("count", optax.safe_int32_increment(state.count))
        return new_updates, state._replace(inner_state=inner_state, **fields)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class MaskUpdate(NamedTuple):
    """What ``update_masks`` sees on a mask-update step: the step ``count``, current ``masks``, raw
    ``grads``, ``params``, the post-step ``new_params`` (``p + u`` on pruned leaves) and the
    method's ``aux`` state (e.g. movement)."""

    count: jax.Array
    masks: PyTree
    grads: PyTree
    params: PyTree
    new_params: PyTree
    aux: Any


def masked(
    inner: optax.GradientTransformation | None,
    *,
    method: str,
    init_masks: Callable[[PyTree], PyTree],
    update_masks: Callable[[MaskUpdate], Any] | None = None,
    should_update: Callable[[jax.Array], jax.Array] | None = None,
    mask_grads: bool = False,
    restart_grown: bool = False,
    init_aux: Callable[[PyTree, PyTree], Any] | None = None,
    update_aux: Callable[[Any, PyTree, PyTree], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """A mask-holding wrapper (state :class:`PruneState`) from a method's mask logic.

    Args:
      inner: the optimizer to wrap (``None``: identity).
      method: its name, for errors.
      init_masks: ``params -> masks`` (bool leaves / ``None``).
      update_masks: ``MaskUpdate -> masks`` (with ``restart_grown``: ``-> (masks, grown)``), run
        only where ``should_update(count)`` (``None``: masks fixed).
      mask_grads: give the inner optimizer ``g * m`` instead of ``g``.
      restart_grown: entries marked ``grown`` start at exactly ``0.0`` with zeroed inner optimizer
        state (:func:`reset_inner_state`).
      init_aux, update_aux: ``(masks, params) -> aux`` and ``(aux, grads, params) -> aux`` for a
        per-step accumulated signal (stored in ``PruneState.movement``).

    On a step without a mask update nothing but the projection ``where(m, u, -p)`` is added to
    the inner optimizer's fused update (and a copy of the bool masks into the new state): the mask
    update, its scores, the post-step params and the inner update they need are computed inside
    the taken branch of the ``lax.cond`` only. With ``restart_grown`` (SET, RigL) the cond spans
    the whole step, so the reset of the regrown entries' optimizer state is not paid on the other
    steps either.

    ``tx.update(grads, state, params, mask_update=False)`` (a Python bool, e.g. a static argument
    of the jitted step) says the caller knows no mask update is due: the step is compiled without
    the ``lax.cond`` and costs exactly a static-sparse step. Two programs then serve a run — call
    the step with ``mask_update=(i % update_period == 0)`` for SET/RigL,
    ``mask_update=bool(schedule.should_update(i))`` for a pruner. An update the schedule
    had due on a ``False`` step is deferred, not lost: the count stays there until a step with
    ``mask_update`` ``True`` or ``None`` (the default: the cond decides on the device) runs it.

    >>> tx = masked(optax.sgd(1.0), method="demo", init_masks=lambda p: {"w": p["w"] > 1})
    >>> p = {"w": jnp.array([1., 2.])}
    >>> u, st = tx.update({"w": jnp.ones(2)}, tx.init(p), p)
    >>> optax.apply_updates(p, u)["w"]
    Array([0., 1.], dtype=float32)
    """
    raw_inner = optax.identity() if inner is None else inner

    def init(params: PyTree) -> dict[str, Any]:
        masks = init_masks(params)
        return {"masks": masks, "movement": None if init_aux is None else init_aux(masks, params)}

    def update(step: InnerStep) -> tuple[PyTree, dict[str, Any], optax.OptState]:
        state, grads, params = step.state, step.grads, step.params
        old = state.masks
        aux = state.movement if update_aux is None else update_aux(state.movement, grads, params)
        fields: dict[str, Any] = {"movement": aux}
        updating = update_masks is not None and step.mask_update is not False
        if update_masks is not None and not updating:
            # the caller says no mask update on this step: the static path below, no cond. An
            # update the schedule had due now is deferred, not lost: the count stays on this step
            fields["count"] = jnp.where(should_update(state.count), state.count,
                                        optax.safe_int32_increment(state.count))
        if updating and restart_grown:  # SET, RigL
            # the whole step is one cond: a step without a mask update runs exactly the static
            # path (masked grads, inner update, projection); resetting the regrown entries' inner
            # state and value masks costs nothing on the other steps
            g_in = apply_masks(grads, old) if mask_grads else grads

            def plain(_: None) -> Any:
                u, st = step.inner(g_in)
                return project(u, params, old), old, st

            def with_update(_: None) -> Any:
                u, st = step.inner(g_in)
                new_params = tree_map_masked(
                    lambda m, p, d: None if m is None else p + d, old, params, u)
                new, grown = update_masks(
                    MaskUpdate(state.count, old, grads, params, new_params, aux))
                st = reset_inner_state(raw_inner, st, grown)
                vm = tree_map_masked(lambda m, g: None if m is None else m & ~g, new, grown)
                return project(u, params, vm), new, st

            new_updates, masks, inner_state = jax.lax.cond(
                should_update(state.count), with_update, plain, None)
            return new_updates, {"masks": masks, **fields}, inner_state
        inner_updates, inner_state = step.inner(apply_masks(grads, old) if mask_grads else grads)
        masks = old
        if updating:
            def do_update(masks_: PyTree) -> Any:
                # the inner update is recomputed here rather than passed in: an operand of the
                # cond would have to be materialised on every step
                u, _ = step.inner(apply_masks(grads, masks_) if mask_grads else grads)
                new_params = tree_map_masked(
                    lambda m, p, d: None if m is None else p + d, masks_, params, u
                )
                return update_masks(MaskUpdate(state.count, masks_, grads, params, new_params, aux))

            masks = jax.lax.cond(should_update(state.count), do_update, lambda m: m, old)
        return project(inner_updates, params, masks), {"masks": masks, **fields}, inner_state

    return wrap(inner, method=method, state_type=PruneState, init=init, update=update)


def reset_inner_state(
    inner: optax.GradientTransformation, inner_state: optax.OptState, reset: PyTree
) -> optax.OptState:
    """Zero every per-parameter entry of ``inner_state`` where ``reset`` (a mask tree) is ``True``.

    Uses :func:`optax.tree_utils.tree_map_params`, so it works for any optax optimizer whose state
    holds parameter-shaped trees (momenta, second moments, ...); scalar state (counts, injected
    hyperparameters) is untouched and optimizers without per-parameter state (plain ``sgd``) pass
    through unchanged.

    >>> tx = optax.sgd(0.1, momentum=0.9)
    >>> st = tx.init({"w": jnp.ones(2)})
    >>> st = optax.tree_utils.tree_map_params(tx, lambda x: x + 1, st)
    >>> reset_inner_state(tx, st, {"w": jnp.array([True, False])})[0].trace["w"]
    Array([0., 1.], dtype=float32)
    """
    flags = tree_map_masked(lambda r: False if r is None else r, reset)

    def f(leaf: Any, r: Any) -> Any:
        if r is False or leaf is None or not hasattr(leaf, "shape"):
            return leaf
        if tuple(leaf.shape) != tuple(r.shape):
            return leaf
        return jnp.where(r, jnp.zeros((), leaf.dtype), leaf)

    # optax.multi_transform / optax.masked put MaskedNode where a param is not theirs: a leaf
    return optax.tree_utils.tree_map_params(
        inner, f, inner_state, flags, is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def project(updates: PyTree, params: PyTree, masks: PyTree) -> PyTree:
    """Return ``u'`` with ``p + u' == m * (p + u)`` exactly zero where ``m`` is off.

    >>> project({"w": jnp.array([1., 1.])}, {"w": jnp.array([2., 3.])}, {"w": jnp.array([True, False])})
    {'w': Array([ 1., -3.], dtype=float32)}
    """
    def f(m, u, p):
        if m is None or u is None:
            return u
        return jnp.where(m, u, -p).astype(u.dtype)

    return tree_map_masked(f, masks, updates, params)


def find_state(opt_state: Any, state_type: type[S], what: str = "") -> S:
    """The single ``state_type`` NamedTuple inside any (nested) optax state, e.g. under ``chain``
    (found with :func:`optax.tree_utils.tree_get_all_with_path`).

    Raises ``ValueError`` if there is none or more than one.

    >>> st = optax.chain(optax.clip(1.), optax.adam(1e-3)).init({"w": jnp.ones(1)})
    >>> find_state(st, optax.ScaleByAdamState).mu
    {'w': Array([0.], dtype=float32)}
    """
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, state_type.__name__, filtering=lambda _, v: isinstance(v, state_type)
    )
    if len(found) != 1:
        where = "" if not found else ": at " + ", ".join(
            jax.tree_util.keystr(p) or "<root>" for p, _ in found)
        raise ValueError(
            f"jaxprune: expected one {state_type.__name__}{what} in the optimizer state, found "
            f"{len(found)}{where}{_nnx_hint(opt_state) if not found else ''}"
        )
    return found[0][1]


def _nnx_hint(x: Any) -> str:
    """Why an nnx object holds no optimizer state we can find (duck-typed: no flax import)."""
    if not type(x).__module__.startswith("flax.nnx"):
        return ""
    kind = type(x).__name__
    if kind == "State":  # nnx.state(optimizer) keeps the values but not the NamedTuple types
        return ("; got an nnx.State, which does not keep the optax state types: pass "
                "optimizer.opt_state (or nnx.as_pure(optimizer.opt_state)), or nnx.update an "
                "optimizer with the state first")
    return (f"; got an nnx {kind}: pass the nnx.Optimizer or its opt_state (the masks live in "
            "the optimizer, not in the model)")


def get_prune_state(opt_state: optax.OptState) -> PruneState:
    """Find the :class:`PruneState` inside any (nested) optax state, e.g. under ``chain``.

    Raises ``ValueError`` if there is none or more than one.

    >>> tx = optax.chain(optax.clip(1.0), jp.training.static_sparse(optax.sgd(0.1), 0.5))
    >>> int(get_prune_state(tx.init({"kernel": jnp.ones((2, 2))})).count)
    0
    """
    return find_state(opt_state, PruneState)


def _is_wrapper(x: Any) -> bool:
    # nnx.Optimizer keeps optimizer state in Variable wrappers (duck-typed: no flax import here)
    return hasattr(x, "get_metadata") and (hasattr(x, "get_value") or hasattr(x, "value"))


def _unwrap(x: Any) -> Any:
    if not _is_wrapper(x):
        return x
    return x.get_value() if hasattr(x, "get_value") else x.value


def get_masks(opt_state: optax.OptState) -> PyTree:
    """The current masks of the (single) pruner inside ``opt_state`` (nnx wrappers removed).

    >>> tx = jp.pruner(optax.sgd(0.1), schedule=jp.schedules.OneShot(0.5, step=0))
    >>> get_masks(tx.init({"kernel": jnp.ones((2, 2))}))["kernel"].shape
    (2, 2)
    """
    masks = get_prune_state(opt_state).masks
    is_leaf = lambda x: x is None or _is_wrapper(x)  # noqa: E731
    if not any(_is_wrapper(x) for x in jax.tree.leaves(masks, is_leaf=is_leaf)):
        return masks
    return jax.tree.map(_unwrap, masks, is_leaf=is_leaf)
