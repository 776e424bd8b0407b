"""Layer (block) pruning: score residual blocks on calibration data, drop the least useful ones.

Scores per block, from the block's input ``h_in`` and output ``h_out`` (per token, last axis):

* angular distance ``arccos(cos(h_in, h_out)) / pi`` (Gromov et al. 2024, n = 1),
* block influence ``1 - cos(h_in, h_out)`` (ShortGPT, Men et al. 2024).

A block that barely changes its input scores near 0 and is removed first. Blocks are linen modules
whose name matches ``pattern`` (default ``Block_<i>``), captured with ``nn.intercept_methods``;
:func:`drop_blocks` deletes them from every collection and renumbers the rest, so the shallower
model is the same class with ``n_layers - n``. Renumbering is wrong for a model whose blocks
depend on their index (Gemma's sliding-window/global pattern, per-layer RoPE bases, per-layer
sizes): ``drop_blocks(..., renumber=False)`` keeps every remaining block under its original name,
for a model that runs only the listed blocks (e.g. ``Gemma(cfg, keep_layers=...)``).

Example:
    >>> v = {"params": {"Block_0": {"w": 0}, "Block_1": {"w": 1}, "Block_2": {"w": 2}, "head": 3}}
    >>> drop_blocks(v, [1])["params"]
    {'Block_0': {'w': 0}, 'Block_1': {'w': 2}, 'head': 3}
    >>> drop_blocks(v, [1], renumber=False)["params"]
    {'Block_0': {'w': 0}, 'Block_2': {'w': 2}, 'head': 3}
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
from flax import linen as nn

from jaxprune.core.masks import PyTree

__all__ = ["BlockScore", "block_scores", "drop_blocks", "choose_blocks"]


class BlockScore(NamedTuple):
    """Calibration scores of one block: ``angular`` in [0, 1] and ``influence`` = 1 - cos."""

    index: int
    name: str
    angular: float
    influence: float


def block_scores(
    apply_fn: Callable[..., Any],
    variables: PyTree,
    batches: Iterable[Any],
    pattern: str = r"^Block_(\d+)$",
    *,
    jit: bool = True,
) -> list[BlockScore]:
    """Angular distance and block influence of every block, averaged over calibration tokens.

    ``pattern`` must match the block module's name and capture its index.

    The per-batch work is one function of ``(variables, batch)`` that returns each block's summed
    scores as arrays (the interceptor only adds traced ``jnp`` values, no host ``float()``), so it
    runs under ``jax.jit`` (``jit=True``: compiled once per batch shape and reused across batches)
    and can be traced inside a caller's own jit; the final averaging into Python floats, sorting
    and naming happen on the host, so ``block_scores`` itself returns host values and is not
    meant to be called under ``jit``. ``jit=False`` runs eagerly (for an ``apply_fn`` that cannot
    be traced).

    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.zoo.models.toy_transformer import ToyConfig, ToyGPT
    >>> m = ToyGPT(ToyConfig(vocab=8, d_model=8, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=4,
    ...                      d_ff=8, max_len=4))
    >>> v = m.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    >>> [s.index for s in block_scores(m.apply, v, [jnp.zeros((2, 4), jnp.int32)])]
    [0, 1]
    """
    import jax

    rx = re.compile(pattern)
    idx: dict[str, int] = {}

    def sums(variables, batch):
        acc: dict[str, Any] = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            mod = context.module
            name = mod.name or ""
            mt = rx.search(name)
            if context.method_name == "__call__" and mt and args:
                h_in = jnp.asarray(args[0], jnp.float32).reshape(-1, args[0].shape[-1])
                h_out = jnp.asarray(out, jnp.float32).reshape(-1, out.shape[-1])
                cos = jnp.sum(h_in * h_out, -1) / (
                    jnp.linalg.norm(h_in, axis=-1) * jnp.linalg.norm(h_out, axis=-1) + 1e-12)
                cos = jnp.clip(cos, -1.0, 1.0)
                key = "/".join(mod.path) if mod.path else name
                a, inf, n = acc.get(key, (0.0, 0.0, 0))
                acc[key] = (a + jnp.sum(jnp.arccos(cos) / jnp.pi), inf + jnp.sum(1.0 - cos),
                            n + int(cos.shape[0]))
                idx[key] = int(mt.group(1)) if mt.groups() else len(idx)
            return out

        with nn.intercept_methods(interceptor):
            apply_fn(variables, batch)
        return {k: (a, inf, jnp.asarray(n, jnp.float32)) for k, (a, inf, n) in acc.items()}

    fn = jax.jit(sums) if jit else sums
    total: dict[str, list[float]] = {}
    for b in batches:
        for k, vals in jax.device_get(fn(variables, b)).items():
            t = total.setdefault(k, [0.0, 0.0, 0.0])
            for j in range(3):
                t[j] += float(vals[j])
    if not total:
        raise ValueError(
            f"jaxprune.structured.block_scores: no module name matched pattern '{pattern}'; "
            "pass the pattern of your block modules' names (with one group capturing the index)"
        )
    return sorted(
        (BlockScore(idx[k], k, a / n, inf / n) for k, (a, inf, n) in total.items()),
        key=lambda s: s.index,
    )


def choose_blocks(scores: Sequence[BlockScore], n: int, metric: str = "angular") -> list[int]:
    """Indices of the ``n`` least useful blocks by ``metric`` (``angular``, ``influence``, or
    ``last`` for the baseline that drops the final ``n`` blocks).

    Refuses to remove every block.

    >>> sc = [BlockScore(0, "Block_0", .5, .3), BlockScore(1, "Block_1", .1, .02),
    ...       BlockScore(2, "Block_2", .2, .05)]
    >>> choose_blocks(sc, 1), choose_blocks(sc, 1, "last")
    ([1], [2])
    """
    if not 0 <= n < len(scores):
        raise ValueError(
            f"jaxprune.structured.choose_blocks: n={n} must be in [0, {len(scores)}) — removing "
            "every block leaves no model"
        )
    if metric == "last":
        return sorted(s.index for s in scores)[len(scores) - n:]
    if metric not in ("angular", "influence"):
        raise ValueError(f"jaxprune.structured.choose_blocks: unknown metric '{metric}'; valid: "
                         "angular, influence, last")
    order = sorted(scores, key=lambda s: (getattr(s, metric), s.index))
    return sorted(s.index for s in order[:n])


def drop_blocks(variables: PyTree, remove: Sequence[int], prefix: str = "Block_", *,
                renumber: bool = True) -> PyTree:
    """Delete blocks ``prefix<i>`` for ``i`` in ``remove`` from every collection.

    ``renumber=True`` renames the rest ``prefix0 .. prefix<n-1>`` (a model whose blocks are all
    alike, built again with fewer layers). ``renumber=False`` keeps each remaining block under its
    original name, so its original index stays with it: use it when a block's behaviour depends
    on its index (Gemma's local/global attention pattern, per-layer RoPE bases or sizes) and run
    only the kept blocks (``Gemma(cfg, keep_layers=...)``); renumbering would hand block 6's
    weights to a model that treats them as block 5 (global instead of local attention).

    Works on nested dicts (linen ``variables`` or ``params``): any dict level whose keys include
    ``prefix<i>`` entries is rewritten.

    >>> drop_blocks({"Block_0": 1, "Block_1": 2}, [0])
    {'Block_0': 2}
    >>> drop_blocks({"Block_0": 1, "Block_1": 2}, [0], renumber=False)
    {'Block_1': 2}
    """
    rx = re.compile("^" + re.escape(prefix) + r"(\d+)$")
    remove = {int(i) for i in remove}
    found: set[int] = set()

    def rec(d):
        if not isinstance(d, dict):
            return d
        blocks = {int(m.group(1)): k for k in d if (m := rx.match(str(k)))}
        if not blocks:
            return {k: rec(v) for k, v in d.items()}
        found.update(blocks)
        out = {}
        for k, v in d.items():
            if k in blocks.values():
                continue
            out[k] = rec(v)
        kept = [i for i in sorted(blocks) if i not in remove]
        if not kept:
            raise ValueError("jaxprune.structured.drop_blocks: refusing to remove every block")
        new = {}
        for j, i in enumerate(kept):
            new[f"{prefix}{j if renumber else i}"] = rec(d[blocks[i]])
        # keep blocks first in insertion order, like linen does
        return {**new, **out}

    res = rec(dict(variables) if not isinstance(variables, dict) else variables)
    missing = sorted(remove - found)
    if missing:
        raise ValueError(f"jaxprune.structured.drop_blocks: no block '{prefix}{missing[0]}' "
                         f"(blocks found: {sorted(found)})")
    return res
