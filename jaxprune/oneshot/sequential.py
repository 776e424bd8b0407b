"""Layer-wise one-shot pruning of a whole model, and the sequential block-by-block driver.

A *layer method* is a :class:`~jaxprune.oneshot.methods.LayerMethod` value (or its registered
name): SparseGPT, OBS, Wanda, magnitude, ``DSnoT(base=...)``. :func:`prune_layers` applies one to
every calibrated kernel of a params tree. :func:`prune_sequential` walks the model as a list of
:class:`BlockSpec`: each block is calibrated on the outputs of the already-pruned blocks (or, with
``dense_inputs=True``, of the dense ones), its layers are pruned, its statistics dropped, and its
pruned outputs feed the next block — one block's statistics in memory at a time. Calibration
records ``XᵀX`` only when the method's ``needs`` include ``"gram"``.

Both return ``(params, masks)`` with ``masks`` mirroring ``params`` (``None`` = not pruned).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> m = nn.Dense(4); p = {"fc": m.init(jax.random.key(0), jnp.ones((1, 4)))["params"]}
    >>> newp, masks = prune_sequential(p, [BlockSpec("fc", m)], [jnp.ones((2, 4))], "magnitude", 0.5,
    ...                                progress=False)
    >>> int(masks["fc"]["kernel"].sum())
    8
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.core import patterns as pat_lib
from jaxprune.core.allocation import check_sparsity
from jaxprune.core.filters import FilterLike, as_filter
from jaxprune.core.masks import PyTree, leaves_with_paths, tree_map_with_path_masked
from jaxprune.oneshot.calibration import LayerStats, calibrate
from jaxprune.oneshot.methods import LayerMethod, get_method

__all__ = ["BlockSpec", "prune_layers", "prune_sequential", "get_path", "set_path"]


class BlockSpec(NamedTuple):
    """One block: ``path`` of its params subtree (``"a/b"``; ``""`` = whole tree), a linen ``module``
    applied as ``module.apply({"params": sub}, *inputs)``, and ``carry(inputs, output) -> next
    inputs`` (default: the output replaces the first input, the other inputs pass through)."""

    path: str
    module: Any
    carry: Callable[[Any, Any], Any] | None = None


def get_path(tree: PyTree, path: str) -> PyTree:
    """Subtree of nested dicts at ``"a/b"``.

    >>> get_path({"a": {"b": 1}}, "a/b")
    1
    """
    if not path:
        return tree
    for k in path.split("/"):
        if k not in tree:
            raise KeyError(f"jaxprune: params have no '{k}' on path '{path}' "
                           f"(keys: {sorted(tree)})")
        tree = tree[k]
    return tree


def set_path(tree: PyTree, path: str, value: Any) -> PyTree:
    """Copy of nested dicts with ``"a/b"`` replaced by ``value``.

    >>> set_path({"a": {"b": 1, "c": 2}}, "a/b", 5)
    {'a': {'b': 5, 'c': 2}}
    """
    if not path:
        return value
    k, _, rest = path.partition("/")
    out = dict(tree)
    out[k] = set_path(tree[k], rest, value)
    return out


class _Plan(NamedTuple):
    method: LayerMethod
    sparsity: Any
    pattern: pat_lib.Pattern
    filter: Callable[[str, Any], bool] | None
    sparsities: dict[str, float]


def _plan(method: str | LayerMethod, sparsity: Any, pattern: pat_lib.Pattern | str,
          filter: FilterLike, sparsities: Mapping[str, float] | None) -> _Plan:
    """Check the driver arguments once, before any calibration runs."""
    meth = get_method(method)
    pat = pat_lib.parse(pattern)
    if sparsity is None and not isinstance(pat, pat_lib.NM | pat_lib.PerLeaf):
        raise ValueError(
            f"jaxprune: pattern {pat} needs an explicit sparsity (only N:M patterns imply one)"
        )
    if sparsity is not None:
        check_sparsity("sparsity", sparsity)
    if sparsities is not None and not isinstance(sparsities, Mapping):
        raise TypeError(
            f"jaxprune: sparsities= must map kernel paths to sparsities, got {type(sparsities)}"
        )
    over = dict(sparsities or {})
    for path, v in over.items():
        check_sparsity(path, v)
    return _Plan(meth, sparsity, pat, None if filter is None else as_filter(filter), over)


def _prune_layers(params: PyTree, stats: dict[str, LayerStats], plan: _Plan, prefix: str = ""
                  ) -> tuple[PyTree, dict[str, jax.Array], set[str]]:
    """``(new params, {full path: mask}, full paths of all calibrated layers)``."""
    masks: dict[str, jax.Array] = {}
    seen: set[str] = set()
    new = params
    for path, st in stats.items():
        full = f"{prefix}/{path}" if prefix else path
        seen.add(full)
        w = get_path(params, path)
        if plan.filter is not None and not plan.filter(full, w):
            continue
        nw, m = plan.method(w, st, plan.sparsities.get(full, plan.sparsity),
                            pattern=pat_lib.for_path(plan.pattern, full), name=full)
        new = set_path(new, path, nw)
        masks[full] = m
    return new, masks, seen


def _check_overrides(plan: _Plan, seen: set[str]) -> None:
    unused = sorted(set(plan.sparsities) - seen)
    if unused:
        raise ValueError(
            f"jaxprune: sparsities= names path(s) {unused} that are not calibrated layers; "
            f"calibrated: {sorted(seen)}"
        )


def _mask_tree(params: PyTree, masks: dict[str, jax.Array]) -> PyTree:
    known = {p for p, _ in leaves_with_paths(params)}
    unknown = [p for p in masks if p not in known]
    if unknown:
        raise ValueError(f"jaxprune: pruned paths {unknown} are not in the params tree")
    return tree_map_with_path_masked(lambda p, x: masks.get(p), params)


def prune_layers(
    params: PyTree,
    stats: dict[str, LayerStats],
    method: str | LayerMethod,
    sparsity: float | None = None,
    *,
    pattern: pat_lib.Pattern | str = "unstructured",
    filter: FilterLike = None,
    sparsities: Mapping[str, float] | None = None,
) -> tuple[PyTree, PyTree]:
    """Prune every kernel of ``params`` that has stats (and passes ``filter``), with ``method``.

    Args:
      params: the params tree (nested dicts) the statistics were recorded on.
      stats: ``{kernel path: LayerStats}`` from :func:`~jaxprune.oneshot.calibration.calibrate`.
      method: a :class:`~jaxprune.oneshot.methods.LayerMethod` or its name.
      sparsity: fraction to prune (``None`` with an N:M pattern: implied).
      pattern: ``"unstructured"``, N:M (``"2:4"``) or a per-path
        :class:`~jaxprune.core.patterns.PerLeaf`.
      filter: which calibrated layers to prune (any :mod:`jaxprune.core.filters` filter, a
        ``(path, leaf) -> bool`` callable or a path regex; default: all calibrated layers).
      sparsities: per-path sparsity overrides ``{kernel path: sparsity}`` (e.g. from
        :func:`~jaxprune.oneshot.owl.owl_sparsities`).

    Returns ``(new_params, masks)``, ``masks`` mirroring ``params`` (``None`` = not pruned).

    >>> import numpy as np
    >>> st = {"k": LayerStats(None, np.zeros(2), np.ones(2), 1, 2)}
    >>> params = {"k": jnp.array([[1., 2.], [3., 4.]]), "b": jnp.ones(2)}
    >>> _, ms = prune_layers(params, st, "magnitude", 0.5)
    >>> ms["k"].tolist(), ms["b"] is None
    ([[False, False], [True, True]], True)
    """
    plan = _plan(method, sparsity, pattern, filter, sparsities)
    new, masks, seen = _prune_layers(params, stats, plan)
    _check_overrides(plan, seen)
    return new, _mask_tree(params, masks)


def _run_block(blk: BlockSpec, params: PyTree, x: Any) -> Any:
    args = x if isinstance(x, tuple) else (x,)
    out = blk.module.apply({"params": params}, *args)
    if blk.carry is not None:
        return blk.carry(x, out)
    return (out, *args[1:]) if isinstance(x, tuple) else out


def prune_sequential(
    params: PyTree,
    blocks: Sequence[BlockSpec],
    inputs: Sequence[Any],
    method: str | LayerMethod,
    sparsity: float | None = None,
    *,
    pattern: pat_lib.Pattern | str = "unstructured",
    filter: FilterLike = None,
    sparsities: Mapping[str, float] | None = None,
    dense_inputs: bool = False,
    progress: bool = True,
) -> tuple[PyTree, PyTree]:
    """Prune block by block; returns ``(pruned params, mask tree mirroring params)``.

    Args:
      params: the model's params (nested dicts).
      blocks: the model as consecutive blocks (first block receives ``inputs``).
      inputs: calibration batches for the first block (a tuple is unpacked into arguments).
      method: a :class:`~jaxprune.oneshot.methods.LayerMethod` or its name; ``XᵀX`` is recorded
        only if ``"gram" in method.needs``.
      sparsity, pattern, filter, sparsities: as in :func:`prune_layers` (paths are full paths
        into ``params``).
      dense_inputs: calibrate every block on the dense model's activations instead.
      progress: show a progress bar over blocks.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> m = nn.Dense(2); p = {"a": m.init(jax.random.key(0), jnp.ones((1, 2)))["params"]}
    >>> _, masks = prune_sequential(p, [BlockSpec("a", m)], [jnp.ones((3, 2))], "wanda", 0.5,
    ...                             progress=False)
    >>> masks["a"]["bias"] is None
    True
    """
    plan = _plan(method, sparsity, pattern, filter, sparsities)
    inputs = list(inputs)
    if not inputs:
        raise ValueError("jaxprune: prune_sequential needs at least one calibration batch")
    known = {p for p, _ in leaves_with_paths(params)}
    stray = sorted(set(plan.sparsities) - known)
    if stray:
        raise ValueError(f"jaxprune: sparsities= names path(s) {stray} that are not in the params tree")
    gram = "gram" in plan.method.needs
    new = params
    all_masks: dict[str, jax.Array] = {}
    seen: set[str] = set()
    xs = inputs
    xs_dense = inputs if dense_inputs else None
    it: Any = blocks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(blocks, desc=f"prune {plan.method.label}", leave=False)
    for blk in it:
        sub = get_path(params, blk.path)
        calib_x = xs_dense if dense_inputs else xs
        has_layers = any(p.endswith("kernel") for p, _ in leaves_with_paths(sub))
        if has_layers:
            stats = calibrate(blk.module, sub, calib_x, gram=gram)
            new_sub, ms, blk_seen = _prune_layers(sub, stats, plan, prefix=blk.path)
            del stats
            all_masks.update(ms)
            seen |= blk_seen
            new = set_path(new, blk.path, new_sub)
        else:
            new_sub = sub
        run = jax.jit(lambda p, x, blk=blk: _run_block(blk, p, x))
        xs = [run(new_sub, x) for x in xs]
        if dense_inputs:
            xs_dense = [run(sub, x) for x in xs_dense]
    _check_overrides(plan, seen)
    return new, _mask_tree(params, all_masks)


_ = jnp  # keep the import for doctests that use jnp
