"""Lottery tickets: iterative magnitude pruning (IMP) with weight or learning-rate rewinding.

Frankle & Carbin (2019) train, prune ``p`` of the remaining weights by magnitude, reset the
survivors to their initial values and repeat. Frankle et al. (2020, "Linear mode connectivity and
the lottery ticket hypothesis") rewind to step ``k`` of the first (dense) run instead of step 0
("late rewinding"); Renda et al. (2020) keep the trained weights and only rewind the
learning-rate schedule ("LR rewinding").

* :func:`keep_rewind_point` wraps any optax optimizer and records the params at step ``k`` in its
  state (:class:`RewindState`), so the rewind point is saved and restored with the training state;
  :func:`get_rewind_point` reads it back (raising if training never reached step ``k``).
* :func:`imp_masks` is one IMP pruning step (:func:`jaxprune.core.pipeline.compute_masks` with
  ``keep_pruned=True``: a pruned weight never comes back, whatever its trained value).
* :func:`rewind` restores the saved values on the surviving weights.
* :func:`imp` is the functional driver: it calls *your* ``train(params, masks)`` each round.

``sparsity`` is the final target: round ``r`` (``r = 1..rounds``) has sparsity
``1 − (1 − sparsity)^(r / rounds)`` on the pruned leaves (each round prunes the same share of the
remaining weights; ``round(s · size)`` entries per leaf with the default uniform allocation).

Example:
    >>> import jax.numpy as jnp
    >>> def train(params, masks):  # your training; here: "learning" doubles every weight
    ...     return jax.tree.map(lambda p: p * 2, params)
    >>> init = {"kernel": jnp.arange(1., 9.).reshape(4, 2)}
    >>> res = imp(init, train, sparsity=0.75, rounds=2, filter=lambda p, x: True)
    >>> [r.sparsity for r in res.rounds]
    [0.0, 0.5, 0.75]
    >>> res.ticket["kernel"]
    Array([[0., 0.],
           [0., 0.],
           [0., 0.],
           [7., 8.]], dtype=float32)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core import allocation as alloc_lib
from jaxprune.core import criteria as crit_lib
from jaxprune.core import masks as mask_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core.masks import Filter, PyTree
from jaxprune.core.pipeline import compute_masks, resolve_sparsity
from jaxprune.training.wrapper import InnerStep, find_state, selected_masks, wrap

__all__ = [
    "RewindState",
    "keep_rewind_point",
    "get_rewind_state",
    "get_rewind_point",
    "imp_sparsity",
    "imp_masks",
    "rewind",
    "Trained",
    "Round",
    "LotteryResult",
    "imp",
]


class RewindState(NamedTuple):
    """State of :func:`keep_rewind_point`: update ``count``, the ``step`` to save, whether it was
    ``saved``, the saved ``params`` and the wrapped optimizer's state."""

    count: jax.Array
    step: jax.Array
    saved: jax.Array
    params: PyTree
    inner_state: optax.OptState


def keep_rewind_point(
    inner: optax.GradientTransformation, step: int
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``inner``; its state keeps a copy of the params as they were after ``step`` updates.

    ``step=0`` saves the initial params. The copy is taken when update ``step + 1`` runs (it sees
    the params after ``step`` updates), so the saved point travels with the optimizer state
    (checkpoints, ``nnx.Optimizer``).

    >>> tx = keep_rewind_point(optax.sgd(1.0), step=1)
    >>> p = {"w": jnp.array(0.)}; s = tx.init(p)
    >>> for _ in range(3):
    ...     u, s = tx.update({"w": jnp.array(-1.)}, s, p); p = optax.apply_updates(p, u)
    >>> float(get_rewind_point(s)["w"]), float(p["w"])
    (1.0, 3.0)
    """
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"jaxprune: rewind step must be an int >= 0, got {step!r}")

    def init(params: PyTree) -> dict[str, Any]:
        return {"step": jnp.asarray(step, jnp.int32), "saved": jnp.asarray(False),
                "params": jax.tree.map(jnp.asarray, params)}

    def update(s: InnerStep) -> tuple[PyTree, dict[str, Any], optax.OptState]:
        hit = s.state.count == s.state.step
        saved = jax.tree.map(lambda new, old: jnp.where(hit, new, old), s.params, s.state.params)
        updates, inner_state = s.inner(s.grads)
        return updates, {"saved": s.state.saved | hit, "params": saved}, inner_state

    return wrap(inner, method="keep_rewind_point", state_type=RewindState, init=init,
                update=update)


def get_rewind_state(opt_state: Any) -> RewindState:
    """Find the single :class:`RewindState` inside any (nested) optax state.

    >>> get_rewind_state(keep_rewind_point(optax.sgd(1.), 0).init({"w": jnp.ones(1)})).saved
    Array(False, dtype=bool)
    """
    return find_state(opt_state, RewindState, " (from keep_rewind_point)")


def get_rewind_point(opt_state: Any, params: PyTree | None = None) -> PyTree:
    """The params saved by :func:`keep_rewind_point` inside ``opt_state``.

    If training ran exactly ``step`` updates, pass the final ``params``: they are the rewind point.
    Raises ``ValueError`` if fewer than ``step`` updates ran.

    >>> s = keep_rewind_point(optax.sgd(1.), 5).init({"w": jnp.ones(1)})
    >>> get_rewind_point(s)
    Traceback (most recent call last):
    ...
    ValueError: jaxprune: rewind step 5 is beyond the 0 steps trained; train longer or rewind earlier
    """
    rs = get_rewind_state(opt_state)
    count, step = int(rs.count), int(rs.step)
    if bool(rs.saved):
        return rs.params
    if params is not None and count == step:
        return params
    raise ValueError(
        f"jaxprune: rewind step {step} is beyond the {count} steps trained; "
        "train longer or rewind earlier"
    )


def imp_sparsity(sparsity: float, r: int, rounds: int) -> float:
    """Sparsity of IMP round ``r`` of ``rounds`` towards the final ``sparsity``:
    ``1 − (1 − sparsity)^(r / rounds)`` (round ``rounds`` reaches ``sparsity``).

    >>> imp_sparsity(0.75, 1, 2), imp_sparsity(0.75, 2, 2)
    (0.5, 0.75)
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"jaxprune: imp_sparsity rounds must be an int >= 1, got {rounds!r}")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= rounds:
        raise ValueError(f"jaxprune: imp_sparsity round r must be an int in [0, rounds={rounds}], got {r!r}")
    return float(1.0 - (1.0 - sparsity) ** (r / rounds))


def imp_masks(
    trained: PyTree,
    masks: PyTree,
    sparsity: float,
    *,
    allocation: alloc_lib.Allocation | str = "uniform",
    pattern: pat_lib.Pattern | str = "unstructured",
    opmap: Any = None,
) -> PyTree:
    """One IMP pruning step: magnitude masks at ``sparsity`` that never revive pruned weights.

    Entries already off in ``masks`` stay off (``compute_masks(..., keep_pruned=True)``: they rank
    below every live weight, whatever their trained value). ``opmap``
    (:func:`jaxprune.operator_map`) makes the pattern act on each leaf's matrix view (N:M along the
    real fan-in of a PyTorch-layout or multi-axis kernel).

    >>> imp_masks({"w": jnp.array([5., 1., 3., 9.])}, {"w": jnp.array([True, True, True, False])},
    ...           0.5)["w"]
    Array([ True, False,  True, False], dtype=bool)
    """
    mask_lib.check_masks(trained, masks)
    scores = crit_lib.magnitude(trained, masks)
    return compute_masks(masks, scores, sparsity, allocation, pattern, keep_pruned=True, opmap=opmap)


def rewind(saved: PyTree, masks: PyTree) -> PyTree:
    """Surviving weights take exactly their ``saved`` values; pruned ones are zero.

    >>> rewind({"w": jnp.array([1., 2.])}, {"w": jnp.array([False, True])})["w"]
    Array([0., 2.], dtype=float32)
    """
    mask_lib.check_masks(saved, masks)
    return mask_lib.apply_masks(saved, masks)


class Trained(NamedTuple):
    """What ``train`` may return instead of bare params: the params and the optimizer state
    (searched for a :class:`RewindState` when rewinding to a step ``k > 0``)."""

    params: PyTree
    opt_state: Any = None


class Round(NamedTuple):
    """One IMP round: index, measured ``sparsity`` of its masks, ``masks``, ``start`` params
    (what training began from) and ``trained`` params."""

    round: int
    sparsity: float
    masks: PyTree
    start: PyTree
    trained: PyTree


class LotteryResult(NamedTuple):
    """:func:`imp`'s result: all ``rounds`` (round 0 is the dense run), the ``rewind_params`` and
    the final ``ticket`` (last masks applied to the rewind point: the untrained sparse net)."""

    rounds: list[Round]
    rewind_params: PyTree
    ticket: PyTree


def _like(tree: PyTree, ref: PyTree) -> PyTree:
    """``tree`` in ``ref``'s structure when only container wrappers differ (e.g. a pure
    ``nnx.State`` vs one holding ``nnx.Param`` variables); otherwise ``tree`` unchanged."""
    rs = jax.tree.structure(ref)
    if jax.tree.structure(tree) == rs:
        return tree
    a, b = mask_lib.leaves_with_paths(tree), mask_lib.leaves_with_paths(ref)
    if [p for p, _ in a] != [p for p, _ in b]:
        return tree
    return jax.tree.unflatten(rs, jax.tree.leaves(tree))


def _measured_sparsity(masks: PyTree) -> float:
    ml = mask_lib.mask_leaves(masks)
    size = sum(int(m.size) for _, m in ml)
    kept = sum(int(jnp.sum(m)) for _, m in ml)
    return 1.0 - kept / max(size, 1)


def imp(
    init_params: PyTree,
    train: Callable[[PyTree, PyTree], PyTree | Trained],
    *,
    sparsity: float | None = None,
    rounds: int,
    rewind_to: int | str = "init",
    rewind_params: PyTree | None = None,
    allocation: alloc_lib.Allocation | str = "uniform",
    pattern: pat_lib.Pattern | str = "unstructured",
    filter: Filter | None = None,
    callback: Callable[[Round], None] | None = None,
    opmap: Any = None,
) -> LotteryResult:
    """Iterative magnitude pruning with rewinding, driving the user's ``train(params, masks)``.

    Args:
      init_params: the initial (dense) params.
      train: trains from ``params`` keeping ``masks`` (e.g. with
        ``jaxprune.training.dst.static_sparse(opt, masks=masks)``) and returns the trained
        params, or :class:`Trained` ``(params, opt_state)``.
      sparsity: the final sparsity in ``(0, 1)``, reached by the last round (``None``: implied
        by an N:M ``pattern``).
      rounds: pruning rounds after the dense run; round ``r`` reaches
        ``1 − (1 − sparsity)^(r / rounds)`` (:func:`imp_sparsity`): each round prunes the same
        share ``1 − (1 − sparsity)^(1 / rounds)`` of the remaining weights.
      rewind_to: ``"init"`` (weights back to ``init_params``), an int ``k`` (late rewinding: the
        params at step ``k`` of the dense run, read from a :func:`keep_rewind_point` state in the
        :class:`Trained` it returned), or ``"lr"`` (learning-rate rewinding: surviving weights keep
        their trained values; ``train`` restarts its own LR schedule each call).
      rewind_params: explicit rewind point (overrides ``rewind_to``'s lookup).
      allocation, pattern: how each round's sparsity is spread and shaped (default: layer-wise
        uniform, unstructured; pass ``"global"`` for a global threshold). With an N:M pattern a
        round's target is rounded down to whole entries per group (the last reaches ``1 − n/m``).
      filter: which leaves are pruned (default: ``kernel`` leaves with ndim >= 2, or the weights
        of ``opmap``).
      opmap: the model's operator map (:func:`jaxprune.operator_map`): patterns act on each
        leaf's matrix view, as everywhere else.
      callback: called with every finished :class:`Round` (logging, checkpoints).

    >>> res = imp({"kernel": jnp.ones((2, 2))}, lambda p, m: p, sparsity=0.5, rounds=1)
    >>> res.rounds[1].sparsity
    0.5
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"jaxprune: IMP rounds must be an int >= 1, got {rounds!r}")
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, int | float)
                                 or not 0.0 < sparsity < 1.0):
        raise ValueError(f"jaxprune: IMP sparsity must be a float in (0, 1), got {sparsity!r}")
    sparsity = float(resolve_sparsity(sparsity, pattern))
    if not (rewind_to in ("init", "lr") or (isinstance(rewind_to, int)
                                           and not isinstance(rewind_to, bool)
                                           and rewind_to >= 0)):
        raise ValueError(
            f"jaxprune: rewind_to must be 'init', 'lr' or a step int >= 0, got {rewind_to!r}"
        )

    def unpack(out: Any) -> tuple[PyTree, Any]:
        if isinstance(out, Trained):
            return _like(out.params, init_params), out.opt_state
        return _like(out, init_params), None

    masks = selected_masks("imp", init_params, filter, pattern, opmap)
    trained, opt_state = unpack(train(init_params, masks))
    history = [Round(0, _measured_sparsity(masks), masks, init_params, trained)]
    if callback is not None:
        callback(history[0])
    if rewind_params is None:
        if rewind_to == "init" or rewind_to == 0:
            rewind_params = init_params
        elif isinstance(rewind_to, int):
            if opt_state is None:
                raise ValueError(
                    f"jaxprune: rewind_to={rewind_to} needs train to return "
                    "Trained(params, opt_state) with a keep_rewind_point(..., step="
                    f"{rewind_to}) optimizer, or pass rewind_params="
                )
            rs = get_rewind_state(opt_state)
            if int(rs.step) != rewind_to:
                raise ValueError(
                    f"jaxprune: rewind_to={rewind_to} but the optimizer keeps step {int(rs.step)}"
                )
            rewind_params = get_rewind_point(opt_state, trained)
    rewind_params = None if rewind_params is None else _like(rewind_params, init_params)
    mask_lib.check_masks(init_params, masks)
    pat = pat_lib.parse(pattern)
    for r in range(1, rounds + 1):
        s_r = imp_sparsity(sparsity, r, rounds)
        if isinstance(pat, pat_lib.NM):  # only whole entries of each group of m are reachable
            s_r = math.floor(s_r * pat.m + 1e-9) / pat.m
        masks = imp_masks(trained, masks, s_r, allocation=allocation, pattern=pattern, opmap=opmap)
        start = mask_lib.apply_masks(trained, masks) if rewind_to == "lr" else rewind(rewind_params,
                                                                             masks)
        trained, _ = unpack(train(start, masks))
        history.append(Round(r, _measured_sparsity(masks), masks, start, trained))
        if callback is not None:
            callback(history[-1])
    base = rewind_params if rewind_params is not None else init_params
    return LotteryResult(history, base, rewind(base, masks))
