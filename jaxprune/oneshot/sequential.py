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

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp  # noqa: F401 - the doctests use it
import numpy as np

from jaxprune.core import patterns as pat_lib
from jaxprune.core.allocation import check_sparsity
from jaxprune.core.filters import FilterLike, as_filter
from jaxprune.core.masks import PyTree, leaves_with_paths, tree_map_with_path_masked
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.methods import LayerMethod, get_method

__all__ = ["BlockSpec", "prune_layers", "prune_sequential", "get_path", "set_path"]


class BlockSpec(NamedTuple):
    """One block of a model for :func:`prune_sequential`.

    ``path``: where the block's params live in the model's params (``"a/b"``, ``"layers/0"``;
    ``""`` = the whole tree). ``fn``: the block's forward pass, any of

    * a plain function ``fn(block_params, *inputs) -> outputs``;
    * a linen ``Module``, applied as ``fn.apply({"params": block_params}, *inputs)``;
    * an nnx ``Module`` (e.g. ``model.layers[0]``), merged with the block's part of
      ``nnx.state(model)``.

    ``carry(inputs, output) -> next inputs`` (default: the output replaces the first input, the
    other inputs pass through). Blocks of equal structure — linen modules differing only by name,
    nnx modules with equal graphs, one function object reused — share compiled programs.

    >>> BlockSpec("layer_0", lambda p, x: x @ p["w"]).path
    'layer_0'
    """

    path: str
    fn: Any
    carry: Callable[[Any, Any], Any] | None = None


def _key(tree: Any, k: str) -> Any:
    """``k`` as a key of ``tree``: the string, or its int for list-like nodes (``nnx.State``)."""
    if isinstance(tree, Mapping):
        if k in tree:
            return k
        if k.lstrip("-").isdigit() and int(k) in tree:
            return int(k)
        raise KeyError(f"jaxprune: params have no '{k}' (keys: {sorted(map(str, tree))})")
    if isinstance(tree, list | tuple) and k.isdigit() and int(k) < len(tree):
        return int(k)
    raise KeyError(f"jaxprune: params have no '{k}' (a {type(tree).__name__} node)")


def get_path(tree: PyTree, path: str) -> PyTree:
    """Subtree at ``"a/b"`` of nested dicts, lists or ``nnx.State`` (``""`` = the whole tree).

    >>> get_path({"a": {"b": 1}}, "a/b"), get_path({"l": [5, 6]}, "l/1")
    (1, 6)
    """
    if not path:
        return tree
    for k in path.split("/"):
        try:
            tree = tree[_key(tree, k)]
        except KeyError as e:
            raise KeyError(f"{e.args[0]} on path '{path}'") from None
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


def _replace_leaves(tree: PyTree, new: Mapping[str, Any], prefix: str = "") -> PyTree:
    """``tree`` with the leaves at ``{full path: value}`` replaced (any pytree: dicts, nnx.State)."""
    if not new:
        return tree
    pre = f"{prefix}/" if prefix else ""
    return tree_map_with_path_masked(lambda p, x: new.get(pre + p, x), tree)


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
    if sparsity is None and not isinstance(pat, pat_lib.PerLeaf):
        sparsity = meth.default_sparsity(pat)  # e.g. GPTQ: 0 (quantize only)
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


def _prune_layers(params: PyTree, stats: Mapping[str, LayerStats], plan: _Plan, prefix: str = "",
                  codes: dict[str, Any] | None = None,
                  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], set[str]]:
    """``({full path: new leaf}, {full path: mask}, full paths of all calibrated layers)`` for the
    layers of ``params`` (a block's subtree at ``prefix``) that ``stats`` has; with ``codes``, each
    layer's integer codes (:meth:`~jaxprune.oneshot.methods.LayerMethod.compress_matrix`) are
    stored there by full path and its new leaf is their dequantized value."""
    new: dict[str, jax.Array] = {}
    masks: dict[str, jax.Array] = {}
    seen: set[str] = set()
    leaves = dict(leaves_with_paths(params))
    # widest fan-in first: a smaller layer of the same width can then run in its compiled program
    for path, st in sorted(stats.items(), key=lambda kv: -kv[1].fan_in):
        full = f"{prefix}/{path}" if prefix else path
        seen.add(full)
        if path not in leaves:
            raise ValueError(f"jaxprune: calibrated layer '{full}' is not a leaf of the params")
        w = leaves[path]
        if plan.filter is not None and not plan.filter(full, w):
            continue
        sp, pat = plan.sparsities.get(full, plan.sparsity), pat_lib.for_path(plan.pattern, full)
        if codes is None:
            new[full], masks[full] = plan.method(w, st, sp, pattern=pat, name=full)
            continue
        codes[full], m2, back = plan.method.compress_with_back(w, st, sp, pat, full)
        new[full], masks[full] = back(codes[full].dequantize()), back(jnp.asarray(m2))
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
    return_codes: bool = False,
) -> tuple[PyTree, PyTree] | tuple[PyTree, PyTree, dict[str, Any]]:
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
      return_codes: also return ``{kernel path: QuantizedWeight}``, the integer codes and group
        scales of each layer's matrix view, for a quantizing ``method`` (GPTQ, ``SparseGPT(quant=
        ...)``, OBR, RoundToNearest); :func:`jaxprune.kernels.pack_params` packs them (``codes=``).

    Returns ``(new_params, masks)``, ``masks`` mirroring ``params`` (``None`` = not pruned), and
    with ``return_codes`` the codes as a third element.

    >>> import numpy as np
    >>> st = {"k": LayerStats(None, np.zeros(2), np.ones(2), 1, 2)}
    >>> params = {"k": jnp.array([[1., 2.], [3., 4.]]), "b": jnp.ones(2)}
    >>> _, ms = prune_layers(params, st, "magnitude", 0.5)
    >>> ms["k"].tolist(), ms["b"] is None
    ([[False, False], [True, True]], True)
    """
    plan = _plan(method, sparsity, pattern, filter, sparsities)
    codes: dict[str, Any] | None = {} if _check_return_codes(return_codes) else None
    bad = next((k for k, v in stats.items() if not isinstance(v, LayerStats)), None) \
        if isinstance(stats, Mapping) else ""
    if bad is not None:
        raise TypeError("jaxprune: prune_layers needs stats {kernel path: LayerStats} from "
                        f"oneshot.calibrate, got {type(stats).__name__}"
                        + (f" with a {type(stats[bad]).__name__} at '{bad}'" if bad else ""))
    new, masks, seen = _prune_layers(params, stats, plan, codes=codes)
    _check_overrides(plan, seen)
    _warn_if_none(masks, len(stats))
    out = _replace_leaves(params, new), _mask_tree(params, masks)
    return out if codes is None else (*out, codes)


def _warn_if_none(masks: dict[str, Any], calibrated: int) -> None:
    if not masks:
        import warnings

        warnings.warn(f"jaxprune: no layer was pruned ({calibrated} calibrated layer(s), none "
                      "selected by the filter); the params are returned unchanged",
                      UserWarning, stacklevel=3)


def _check_return_codes(flag: Any) -> bool:
    if not isinstance(flag, bool):
        raise TypeError(f"jaxprune: return_codes must be a bool, got {flag!r}")
    return flag


def _block_fn(blk: BlockSpec, sub: PyTree) -> Callable[..., Any]:
    """The block as ``fn(block_params, *inputs)``, normalised so that equal blocks compare equal
    (the compiled programs are cached on it)."""
    from flax import linen as nn
    from flax import nnx

    from jaxprune.oneshot.observe import _NnxApply, model_fn

    f = blk.fn
    if isinstance(f, nnx.Module):
        fn, state = model_fn(f)
        want = jax.tree.structure(state)
        if jax.tree.structure(sub) == want:
            return fn
        gd, p_only, rest = nnx.split(f, nnx.Param, ...)
        if jax.tree.structure(sub) == jax.tree.structure(p_only):
            return _NnxApply(gd, rest)  # the other Variables (BatchNorm stats, Rngs) held
        raise ValueError(
            f"jaxprune: block '{blk.path}': the params there do not match the nnx module's state "
            f"(pass nnx.state(model) or nnx.state(model, nnx.Param) as params, and the module's "
            f"path in it); params there: {jax.tree.structure(sub)}, module state: {want}"
        )
    if isinstance(f, nn.Module):
        return model_fn(f, None)[0]
    if callable(f):
        return f
    raise TypeError(
        f"jaxprune: block '{blk.path}': expected a function fn(block_params, *inputs), a linen or "
        f"an nnx Module, got {type(f).__name__}"
    )


def _apply_block(fn: Callable[..., Any], carry: Any, params: PyTree, x: Any) -> Any:
    args = x if isinstance(x, tuple) else (x,)
    out = fn(params, *args)
    if carry is not None:
        return carry(x, out)
    return (out, *args[1:]) if isinstance(x, tuple) else out


@functools.lru_cache(maxsize=128)
def _forward(fn: Callable[..., Any], carry: Any) -> Callable[..., Any]:
    """One jitted forward per (block function, carry); jit compiles it once per input shape."""
    return jax.jit(functools.partial(_apply_block, fn, carry))


def _forward_program(fn: Callable[..., Any], carry: Any) -> Callable[..., Any]:
    try:
        return _forward(fn, carry)
    except TypeError as e:  # an unhashable function: compile for this block only
        if "unhashable" not in str(e):
            raise
        return jax.jit(functools.partial(_apply_block, fn, carry))


def _has_layers(fn: Callable[..., Any], sub: PyTree, x: Any) -> bool:
    """Whether the block multiplies any of its params with data (the operator map, cached)."""
    from jaxprune.oneshot.observe import operator_map_of

    om = operator_map_of(fn, sub, x if isinstance(x, tuple) else (x,))
    return any(lo.has_view for lo in om.leaves)


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
    token_masks: Sequence[Any] | None = None,
    dense_inputs: bool = False,
    progress: bool = True,
    return_codes: bool = False,
) -> tuple[PyTree, PyTree] | tuple[PyTree, PyTree, dict[str, Any]]:
    """Prune block by block; returns ``(pruned params, mask tree mirroring params)`` (and with
    ``return_codes`` the integer codes, as in :func:`prune_layers`).

    Each block is calibrated at the operator level (every matmul/conv weight it multiplies with
    data: Dense, DenseGeneral, einsum params, PyTorch-layout ``x @ W.T``, convs) on the outputs of
    the already-pruned blocks, its layers are pruned, and its pruned outputs feed the next block.
    Each distinct block structure is compiled once per input shape (calibration and forward).

    Args:
      params: the model's params (nested dicts, or ``nnx.state(model)`` for nnx blocks).
      blocks: the model as consecutive :class:`BlockSpec` s (the first receives ``inputs``).
      inputs: calibration batches for the first block (a tuple is unpacked into arguments); shapes
        may vary (bucket them to a few shapes: one compilation each).
      method: a :class:`~jaxprune.oneshot.methods.LayerMethod` or its name; ``XᵀX`` is recorded
        only if ``"gram" in method.needs``.
      sparsity, pattern, filter, sparsities: as in :func:`prune_layers` (paths are full paths
        into ``params``).
      token_masks: one mask per batch (e.g. ``(batch, seq)``, 1 = real token) excluding padding
        from every block's statistics (see :func:`jaxprune.oneshot.observe.observe`).
      dense_inputs: calibrate every block on the dense model's activations instead.
      progress: show a progress bar over blocks.
      return_codes: also return ``{kernel path: QuantizedWeight}`` (see :func:`prune_layers`).

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> m = nn.Dense(2); p = {"a": m.init(jax.random.key(0), jnp.ones((1, 2)))["params"]}
    >>> _, masks = prune_sequential(p, [BlockSpec("a", m)], [jnp.ones((3, 2))], "wanda", 0.5,
    ...                             progress=False)
    >>> masks["a"]["bias"] is None, float(masks["a"]["kernel"].mean())
    (True, 0.5)
    >>> relu = lambda p, x: jax.nn.relu(x @ p["w"].T)        # a plain function, PyTorch layout
    >>> q = {"l0": {"w": jnp.ones((4, 2))}, "l1": {"w": jnp.ones((4, 4))}}
    >>> _, masks = prune_sequential(q, [BlockSpec("l0", relu), BlockSpec("l1", relu)],
    ...                             [jnp.ones((3, 2))], "magnitude", 0.5, progress=False)
    >>> int(masks["l1"]["w"].sum())
    8
    """
    from jaxprune.oneshot.observe import observe

    plan = _plan(method, sparsity, pattern, filter, sparsities)
    codes: dict[str, Any] | None = {} if _check_return_codes(return_codes) else None
    inputs = list(inputs)
    if not inputs:
        raise ValueError("jaxprune: prune_sequential needs at least one calibration batch")
    if token_masks is not None:
        # (device_put: jnp.asarray of a numpy array compiles a copy per shape)
        token_masks = [m if isinstance(m, jax.Array) else jax.device_put(np.asarray(m))
                       for m in token_masks]
        if len(token_masks) != len(inputs):
            raise ValueError(f"jaxprune: {len(token_masks)} token masks for {len(inputs)} batches")
    known = {p for p, _ in leaves_with_paths(params)}
    stray = sorted(set(plan.sparsities) - known)
    if stray:
        raise ValueError(f"jaxprune: sparsities= names path(s) {stray} that are not in the params tree")
    gram = "gram" in plan.method.needs
    new_leaves: dict[str, jax.Array] = {}
    all_masks: dict[str, jax.Array] = {}
    seen: set[str] = set()
    xs = inputs
    xs_dense = inputs if dense_inputs else None
    it: Any = blocks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(blocks, desc=f"prune {plan.method.label}", leave=False)
    for bi, blk in enumerate(it):
        sub = get_path(params, blk.path)
        fn = _block_fn(blk, sub)
        calib_x = xs_dense if dense_inputs else xs
        new_sub = sub
        if _has_layers(fn, sub, calib_x[0]):
            stats = observe(fn, sub, calib_x, gram=gram, token_masks=token_masks)
            nl, ms, blk_seen = _prune_layers(sub, stats, plan, prefix=blk.path, codes=codes)
            del stats
            new_leaves.update(nl)
            all_masks.update(ms)
            seen |= blk_seen
            new_sub = _replace_leaves(sub, nl, blk.path)
        if bi == len(blocks) - 1:
            break  # the last block's outputs feed nothing
        run = _forward_program(fn, blk.carry)
        xs = [run(new_sub, x) for x in xs]
        if dense_inputs:
            xs_dense = [run(sub, x) for x in xs_dense]
    _check_overrides(plan, seen)
    _warn_if_none(all_masks, len(seen))
    out = _replace_leaves(params, new_leaves), _mask_tree(params, all_masks)
    return out if codes is None else (*out, codes)
