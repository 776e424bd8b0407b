"""Pruning at initialisation: SNIP, GraSP and SynFlow scores, fed to the shared pipeline.

Every ``*_scores`` function returns a score pytree with the convention of
:mod:`jaxprune.core.criteria` (higher = kept), ``None`` where the mask is ``None``; the pruning helpers
turn scores into masks with :func:`jaxprune.core.pipeline.compute_masks` (global allocation by default,
as in the papers, with no per-layer floor — so whole layers can be pruned away: *layer collapse*,
reported by :func:`collapsed_layers`). :func:`snip`, :func:`grasp` and :func:`synflow` return
``(params, masks)`` like :func:`jaxprune.prune`: the params with the pruned entries zeroed.

* **SNIP** (Lee et al. 2019): ``|g ⊙ w|`` on one batch (:data:`jaxprune.core.criteria.saliency`).
* **GraSP** (Wang et al. 2020): the paper scores ``S = −w ⊙ (H g)`` and removes the *highest* ``S``;
  :func:`grasp_scores` returns ``−S = w ⊙ (H g)`` so that higher = kept. ``H g`` is a
  Hessian-vector product (forward-over-reverse ``jax.jvp`` of ``jax.grad``), never a Hessian.
* **SynFlow** (Tanaka et al. 2020): data-free. The model is evaluated on an all-ones input with
  ``|w|`` (masked) params, ``R = Σ f(1; |w|)``, and the score is ``|∂R/∂w ⊙ w|``; pruning is
  iterative over ``rounds`` with the exponential density schedule ``d_k = d^(k/K)``.

SynFlow and non-positively-homogeneous layers: the conservation law behind SynFlow (the scores of
every layer sum to ``R``) holds only when each layer is positively homogeneous (ReLU, linear,
pooling, no normalisation). :func:`synflow_scores` does **not** linearise your model — it cannot
reach inside an arbitrary ``apply_fn``; it evaluates the model *as given* on the all-ones input with
``|w|``. With ``tanh``/``sigmoid``/``gelu`` or normalisation layers the scores are still the exact
``|∂R/∂w ⊙ w|`` of that function, but they no longer conserve flow (layers feeding a saturating or
scale-invariant layer get systematically smaller scores and are the first to collapse). For the
behaviour of the paper, pass an ``apply_fn`` that swaps such activations for ReLU/identity and runs
normalisation in a linear (eval, unit-statistics) mode. Biases count in ``R`` (made positive too).

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"l1": {"kernel": jnp.array([[1., -2.], [3., 0.5]])},
    ...           "l2": {"kernel": jnp.array([[1.], [2.]])}}
    >>> apply = lambda p, x: jax.nn.relu(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
    >>> synflow_scores(apply, params, (1, 2))["l1"]["kernel"]
    Array([[1., 4.],
           [3., 1.]], dtype=float32)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import allocation as alloc_lib
from jaxprune.core import criteria as crit_lib
from jaxprune.core import masks as mask_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core.masks import Filter, PyTree
from jaxprune.core.pipeline import compute_masks, resolve_sparsity
from jaxprune.training.wrapper import selected_masks

__all__ = [
    "snip_scores",
    "grasp_scores",
    "synflow_scores",
    "masks_from_scores",
    "snip",
    "grasp",
    "synflow",
    "collapsed_layers",
    "DEFAULT_ALLOCATION",
]

DEFAULT_ALLOCATION = alloc_lib.Global(min_density=0.0)

LossFn = Callable[[PyTree, Any], jax.Array]


def _masks_for(params: PyTree, masks: PyTree | None, filter: Filter | None) -> PyTree:
    if masks is None:
        return mask_lib.init_masks(params, filter)
    mask_lib.check_masks(params, masks)
    return masks


def snip_scores(loss_fn: LossFn, params: PyTree, batch: Any, masks: PyTree | None = None,
                *, filter: Filter | None = None) -> PyTree:
    """SNIP connection sensitivity ``|∂L/∂w ⊙ w|`` on one batch.

    >>> p = {"kernel": jnp.array([[1., -2.]])}
    >>> snip_scores(lambda p, b: jnp.sum(b @ p["kernel"]) , p, jnp.array([[3.]]))["kernel"]
    Array([[3., 6.]], dtype=float32)
    """
    masks = _masks_for(params, masks, filter)
    grads = jax.grad(loss_fn)(params, batch)
    return crit_lib.saliency(params, masks, grads=grads)


def grasp_scores(loss_fn: LossFn, params: PyTree, batch: Any, masks: PyTree | None = None,
                 *, filter: Filter | None = None) -> PyTree:
    """GraSP keep-scores ``w ⊙ (H g)`` (the negated paper score ``S = −w ⊙ Hg``).

    ``g = ∇L`` (held constant), ``H g`` a Hessian-vector product. Higher = kept, so removing the
    highest ``S`` (the paper's rule) is removing the lowest of these scores.

    >>> loss = lambda p, b: jnp.sum(p["kernel"] ** 3)  # g = 3w², H = diag(6w), Hg = 18 w³
    >>> grasp_scores(loss, {"kernel": jnp.array([[1., -1.]])}, None)["kernel"]
    Array([[18., 18.]], dtype=float32)
    """
    masks = _masks_for(params, masks, filter)
    grad_fn = jax.grad(loss_fn)
    g = jax.lax.stop_gradient(grad_fn(params, batch))
    _, hg = jax.jvp(lambda p: grad_fn(p, batch), (params,), (g,))
    return mask_lib.tree_map_masked(
        lambda m, w, v: None if m is None else (w * v).astype(jnp.float32), masks, params, hg
    )


def synflow_scores(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree,
                   input_shape: Sequence[int], masks: PyTree | None = None,
                   *, filter: Filter | None = None, dtype: Any = jnp.float32) -> PyTree:
    """SynFlow scores ``|∂R/∂w ⊙ w|`` of ``R = Σ apply_fn(|w| ⊙ m, ones(input_shape))``.

    Every leaf (biases too) is made positive; pruned entries (mask off) are zero. Data-free.
    ``input_shape`` includes the batch dimension (use 1). See the module doc for models with
    non-positively-homogeneous layers.

    >>> ap = lambda p, x: x @ p["kernel"]
    >>> synflow_scores(ap, {"kernel": jnp.array([[2.], [-3.]])}, (1, 2))["kernel"]
    Array([[2.],
           [3.]], dtype=float32)
    """
    masks = _masks_for(params, masks, filter)
    absp = mask_lib.tree_map_masked(
        lambda m, w: jnp.abs(w) if m is None else jnp.where(m, jnp.abs(w), 0.0), masks, params
    )
    ones = jnp.ones(tuple(input_shape), dtype)

    def r_fn(p: PyTree) -> jax.Array:
        return jnp.sum(apply_fn(p, ones))

    grads = jax.grad(r_fn)(absp)
    return mask_lib.tree_map_masked(
        lambda m, w, g: None if m is None else jnp.abs(g * w).astype(jnp.float32),
        masks, absp, grads,
    )


_NONFINITE_HINT = {
    "synflow": "SynFlow can overflow float32 on deep nets: try dtype=jnp.float64 with "
               "jax_enable_x64, or fewer layers",
    "snip": "the loss or its gradient at these params is not finite: check loss_fn and the batch",
    "grasp": "the loss, its gradient or the Hessian-gradient product at these params is not "
             "finite: check loss_fn and the batch",
}


def _check_finite_scores(scores: PyTree, method: str = "") -> None:
    hint = _NONFINITE_HINT.get(method, "scores must be finite")
    for path, s in mask_lib.leaves_with_paths(scores):
        if s is None or isinstance(s, jax.core.Tracer):
            continue
        a = np.asarray(s)
        if not np.all(np.isfinite(a)):
            raise ValueError(
                f"jaxprune: {method + ' ' if method else ''}scores for '{path}' contain "
                f"{int((~np.isfinite(a)).sum())} non-finite values ({hint})"
            )


def masks_from_scores(
    masks: PyTree,
    scores: PyTree,
    sparsity: float,
    *,
    allocation: alloc_lib.Allocation | str = DEFAULT_ALLOCATION,
    pattern: pat_lib.Pattern | str = "unstructured",
    keep_pruned: bool = False,
    method: str = "",
    opmap: Any = None,
) -> PyTree:
    """Masks at ``sparsity`` from ``scores`` via :func:`jaxprune.core.pipeline.compute_masks`.

    Whole leaves may be pruned (sparsity 1.0) when the allocation allows it (the default global
    allocation has no floor). ``keep_pruned=True`` keeps the ``False`` entries of ``masks`` pruned.
    Raises ``ValueError`` naming the leaf for non-finite scores.

    >>> m = masks_from_scores({"a": jnp.ones(2, bool), "b": jnp.ones(2, bool)},
    ...                       {"a": jnp.array([1., 2.]), "b": jnp.array([3., 4.])}, 0.5)
    >>> m["a"], m["b"]
    (Array([False, False], dtype=bool), Array([ True,  True], dtype=bool))
    """
    pat = pat_lib.parse(pattern)
    sparsity = _check_sparsity(sparsity, pat)
    _check_finite_scores(scores, method)
    alloc = alloc_lib.get(allocation)
    return compute_masks(masks, scores, sparsity, alloc, pat, keep_pruned=keep_pruned, opmap=opmap)


def _check_sparsity(sparsity: Any, pattern: pat_lib.Pattern | str) -> float:
    if isinstance(sparsity, str):
        raise ValueError(f"jaxprune: sparsity must be a float, got {sparsity!r}")
    return resolve_sparsity(sparsity, pattern)


def snip(loss_fn: LossFn, params: PyTree, batch: Any, sparsity: float | None = None, *,
         allocation: alloc_lib.Allocation | str = DEFAULT_ALLOCATION,
         pattern: pat_lib.Pattern | str = "unstructured",
         filter: Filter | None = None, opmap: Any = None) -> tuple[PyTree, PyTree]:
    """SNIP at ``sparsity`` (global by default): ``(params with pruned entries zeroed, masks)``.

    >>> p = {"kernel": jnp.array([[1., -2.], [0.5, 3.]])}
    >>> pruned, m = snip(lambda p, b: jnp.sum(b @ p["kernel"]), p, jnp.ones((1, 2)), 0.5)
    >>> m["kernel"]
    Array([[False,  True],
           [False,  True]], dtype=bool)
    >>> pruned["kernel"]
    Array([[ 0., -2.],
           [ 0.,  3.]], dtype=float32)
    """
    masks = selected_masks("snip", params, filter, pattern, opmap)
    scores = snip_scores(loss_fn, params, batch, masks)
    masks = masks_from_scores(masks, scores, sparsity, allocation=allocation, pattern=pattern,
                              method="snip", opmap=opmap)
    return mask_lib.apply_masks(params, masks), masks


def grasp(loss_fn: LossFn, params: PyTree, batch: Any, sparsity: float | None = None, *,
          allocation: alloc_lib.Allocation | str = DEFAULT_ALLOCATION,
          pattern: pat_lib.Pattern | str = "unstructured",
          filter: Filter | None = None, opmap: Any = None) -> tuple[PyTree, PyTree]:
    """GraSP at ``sparsity``: keep the weights whose removal least reduces gradient flow.
    Returns ``(params with pruned entries zeroed, masks)``.

    >>> p = {"kernel": jnp.array([[1., -2.], [0.5, 3.]])}
    >>> grasp(lambda p, b: jnp.sum(p["kernel"] ** 3), p, None, 0.5)[1]["kernel"]
    Array([[False,  True],
           [False,  True]], dtype=bool)
    """
    masks = selected_masks("grasp", params, filter, pattern, opmap)
    scores = grasp_scores(loss_fn, params, batch, masks)
    masks = masks_from_scores(masks, scores, sparsity, allocation=allocation, pattern=pattern,
                              method="grasp", opmap=opmap)
    return mask_lib.apply_masks(params, masks), masks


def synflow(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree,
            input_shape: Sequence[int], sparsity: float | None = None, *, rounds: int = 100,
            allocation: alloc_lib.Allocation | str = DEFAULT_ALLOCATION,
            pattern: pat_lib.Pattern | str = "unstructured",
            filter: Filter | None = None,
            dtype: Any = jnp.float32, opmap: Any = None) -> tuple[PyTree, PyTree]:
    """Iterative SynFlow: ``rounds`` score/prune rounds to density ``d^(k/K)``, ``k = 1..K``.

    Entries pruned in a round stay pruned (``keep_pruned=True``). With an N:M pattern each round's
    target is rounded down to whole entries per group (the last round reaches ``1 − n/m``).
    ``opmap`` (:func:`jaxprune.operator_map`) makes patterns act on each leaf's matrix view.
    Returns ``(params with pruned entries zeroed, masks)``.

    >>> ap = lambda p, x: x @ p["kernel"]
    >>> synflow(ap, {"kernel": jnp.array([[2.], [-3.], [1.], [4.]])}, (1, 4), 0.5, rounds=2)[1]["kernel"]
    Array([[False],
           [ True],
           [False],
           [ True]], dtype=bool)
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"jaxprune: synflow rounds must be an int >= 1, got {rounds!r}")
    sparsity = _check_sparsity(sparsity, pattern)
    pat = pat_lib.parse(pattern)
    masks = selected_masks("synflow", params, filter, pattern, opmap)
    score_fn = jax.jit(
        lambda p, m: synflow_scores(apply_fn, p, input_shape, m, dtype=dtype)
    )
    try:  # the model on ones(input_shape), once, so a wrong input_shape names itself
        jax.eval_shape(score_fn, params, masks)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"jaxprune: synflow: apply_fn(params, ones({tuple(input_shape)})) failed: "
            f"{type(e).__name__}: {str(e)[:300]} (input_shape is the model's input shape with a "
            "batch dimension, e.g. (1, 28, 28, 1))") from e
    for k in range(1, rounds + 1):
        s_k = 1.0 - (1.0 - sparsity) ** (k / rounds)
        if isinstance(pat, pat_lib.NM):  # only whole entries of each group of m are reachable
            s_k = math.floor(s_k * pat.m + 1e-9) / pat.m
        masks = masks_from_scores(masks, score_fn(params, masks), s_k, allocation=allocation,
                                  pattern=pattern, keep_pruned=True, method="synflow",
                                  opmap=opmap)
    return mask_lib.apply_masks(params, masks), masks


def collapsed_layers(masks: PyTree) -> list[str]:
    """Paths of pruned leaves with no weight left (layer collapse).

    >>> collapsed_layers({"a": jnp.zeros(3, bool), "b": jnp.ones(3, bool), "c": None})
    ['a']
    """
    return [p for p, m in mask_lib.mask_leaves(masks) if m.size and not bool(jnp.any(m))]
