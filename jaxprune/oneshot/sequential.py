"""Layer-wise one-shot pruning of a whole model, and the sequential block-by-block driver.

A *layer method* is any ``(weight, stats, target, *, name) -> (new_weight, mask)`` (SparseGPT, OBS,
Wanda, magnitude, ``with_dsnot(...)``). :func:`prune_layers` applies one to every calibrated kernel
of a params tree. :func:`prune_sequential` walks the model as a list of :class:`BlockSpec`: each
block is calibrated on the outputs of the already-pruned blocks (or, with ``dense_inputs=True``, of
the dense ones), its layers are pruned, its statistics dropped, and its pruned outputs feed the next
block — one block's statistics in memory at a time.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from jaxprune.oneshot.wanda import magnitude
    >>> m = nn.Dense(4); p = {"fc": m.init(jax.random.key(0), jnp.ones((1, 4)))["params"]}
    >>> newp, masks = prune_sequential(p, [BlockSpec("fc", m)], [jnp.ones((2, 4))], magnitude, 0.5,
    ...                                progress=False)
    >>> int(masks["fc"]["kernel"].sum())
    8
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.core.masks import Filter, PyTree, leaves_with_paths, tree_map_with_path_masked
from jaxprune.oneshot.calibration import LayerStats, calibrate
from jaxprune.oneshot.common import Target

__all__ = ["BlockSpec", "prune_layers", "prune_sequential", "get_path", "set_path", "METHODS",
           "get_method"]

LayerMethod = Callable[..., tuple[jax.Array, jax.Array]]


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


def _target_for(path: str, target: Target, targets: dict[str, float] | None) -> Target:
    if targets and path in targets:
        return targets[path]
    return target


def prune_layers(
    params: PyTree,
    stats: dict[str, LayerStats],
    method: LayerMethod,
    target: Target,
    *,
    filter: Filter | None = None,
    targets: dict[str, float] | None = None,
    prefix: str = "",
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Prune every kernel of ``params`` that has stats (and passes ``filter(path, leaf)``).

    Returns ``(new_params, {path: mask})``; ``prefix`` is prepended to paths for ``filter``,
    ``targets`` (per-path sparsity overrides, e.g. from OWL) and messages.

    >>> import numpy as np
    >>> from jaxprune.oneshot.wanda import magnitude
    >>> st = {"k": LayerStats(None, np.zeros(2), np.ones(2), 1, 2)}
    >>> _, ms = prune_layers({"k": jnp.array([[1., 2.], [3., 4.]])}, st, magnitude, 0.5)
    >>> ms["k"].tolist()
    [[False, False], [True, True]]
    """
    masks: dict[str, jax.Array] = {}
    new = params
    for path, st in stats.items():
        full = f"{prefix}/{path}" if prefix else path
        w = get_path(params, path)
        if filter is not None and not filter(full, w):
            continue
        nw, m = method(w, st, _target_for(full, target, targets), name=full)
        new = set_path(new, path, nw)
        masks[full] = m
    return new, masks


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
    method: LayerMethod,
    target: Target,
    *,
    filter: Filter | None = None,
    targets: dict[str, float] | None = None,
    dense_inputs: bool = False,
    progress: bool = True,
) -> tuple[PyTree, PyTree]:
    """Prune block by block; returns ``(pruned params, mask tree mirroring params)``.

    Args:
      params: the model's params (nested dicts).
      blocks: the model as consecutive blocks (first block receives ``inputs``).
      inputs: calibration batches for the first block (a tuple is unpacked into arguments).
      method: layer method (``getattr(method, "needs_gram", True)`` decides whether ``XᵀX`` is kept).
      target: sparsity or ``"N:M"``; ``targets`` overrides per kernel path.
      filter: ``(path, kernel) -> bool`` choosing which calibrated layers are pruned.
      dense_inputs: calibrate every block on the dense model's activations instead.

    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> from jaxprune.oneshot.wanda import wanda
    >>> m = nn.Dense(2); p = {"a": m.init(jax.random.key(0), jnp.ones((1, 2)))["params"]}
    >>> _, masks = prune_sequential(p, [BlockSpec("a", m)], [jnp.ones((3, 2))], wanda, 0.5,
    ...                             progress=False)
    >>> masks["a"]["bias"] is None
    True
    """
    inputs = list(inputs)
    if not inputs:
        raise ValueError("jaxprune: prune_sequential needs at least one calibration batch")
    gram = bool(getattr(method, "needs_gram", True))
    new = params
    all_masks: dict[str, jax.Array] = {}
    xs = inputs
    xs_dense = inputs if dense_inputs else None
    it: Any = blocks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(blocks, desc=f"prune {getattr(method, '__name__', 'layers')}", leave=False)
    for blk in it:
        sub = get_path(params, blk.path)
        calib_x = xs_dense if dense_inputs else xs
        has_layers = any(p.endswith("kernel") for p, _ in leaves_with_paths(sub))
        if has_layers:
            stats = calibrate(blk.module, sub, calib_x, gram=gram)
            new_sub, ms = prune_layers(sub, stats, method, target, filter=filter,
                                       targets=targets, prefix=blk.path)
            del stats
            all_masks.update(ms)
            new = set_path(new, blk.path, new_sub)
        else:
            new_sub = sub
        run = jax.jit(lambda p, x, blk=blk: _run_block(blk, p, x))
        xs = [run(new_sub, x) for x in xs]
        if dense_inputs:
            xs_dense = [run(sub, x) for x in xs_dense]
    known = {p for p, _ in leaves_with_paths(params)}
    unknown = [p for p in all_masks if p not in known]
    if unknown:
        raise ValueError(f"jaxprune: pruned paths {unknown} are not in the params tree")
    mask_tree = tree_map_with_path_masked(lambda p, x: all_masks.get(p), params)
    return new, mask_tree


def _methods() -> dict[str, LayerMethod]:
    from jaxprune.oneshot.dsnot import with_dsnot
    from jaxprune.oneshot.obs import obs
    from jaxprune.oneshot.sparsegpt import sparsegpt
    from jaxprune.oneshot.wanda import magnitude, wanda

    return {
        "magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt, "obs": obs,
        "wanda+dsnot": with_dsnot(wanda), "sparsegpt+dsnot": with_dsnot(sparsegpt),
    }


METHODS = ("magnitude", "wanda", "sparsegpt", "obs", "wanda+dsnot", "sparsegpt+dsnot")


def get_method(name: str) -> LayerMethod:
    """A layer method by name: one of :data:`METHODS`.

    >>> get_method("wanda+dsnot").__name__
    'wanda+dsnot'
    """
    table = _methods()
    if name not in table:
        raise ValueError(f"jaxprune: unknown one-shot method '{name}'; valid: {list(METHODS)}")
    return table[name]


_ = jnp  # keep the import for doctests that use jnp
