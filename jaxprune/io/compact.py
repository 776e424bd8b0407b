"""Compact checkpoints of pruned models: only the kept values plus small index metadata.

Each pruned leaf (mask not ``None``) is packed by its pattern:

* ``unstructured`` (and ``channel``): a bitmask (``np.packbits``, 1 bit/entry) + the kept values.
* ``N:M``: per group of ``m`` along the pattern axis, ``n`` kept values and ``uint8`` positions
  (``m`` marks an empty slot, so groups with fewer than ``n`` kept entries round-trip).
* ``block RxC``: a bitmask over blocks of the ``(fan_in, out)`` matrix view + the kept blocks.

Unpruned leaves are stored dense. Restoring gives back *exactly* the dense params and the masks
(a kept weight that happens to be ``0.0`` stays kept). Arrays are written with orbax
(``<dir>/arrays``) next to a JSON index (``<dir>/jaxprune_sparse.json``) with paths, shapes,
dtypes and formats.

The packing here is plain numpy on the host; ``jaxprune.kernels.formats`` (packed pytrees consumed
by the sparse kernels) did not exist when this was written, so the two should be merged.

Example:
    >>> import tempfile, jax.numpy as jnp, jaxprune as jp
    >>> params = {"d": {"kernel": jnp.arange(1., 65.).reshape(16, 4), "bias": jnp.ones(4)}}
    >>> pruned, masks = jp.prune(params, 0.75)
    >>> d = tempfile.mkdtemp() + "/sparse"
    >>> info = save_sparse(d, pruned, masks)
    >>> p2, m2 = load_sparse(d, template=params)
    >>> bool((p2["d"]["kernel"] == pruned["d"]["kernel"]).all()), m2["d"]["bias"] is None
    (True, True)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxprune.core import patterns as pat_lib
from jaxprune.core.masks import PyTree, _is_none, check_masks, leaves_with_paths
from jaxprune.io.checkpoint import CheckpointMismatchError, check_structure, dir_size

__all__ = ["pack", "unpack", "save_sparse", "load_sparse", "META_FILE"]

META_FILE = "jaxprune_sparse.json"
FORMAT_VERSION = 1


def _pack_leaf(path: str, w: np.ndarray, m: np.ndarray, pat: pat_lib.Pattern
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    info: dict[str, Any] = {"shape": list(w.shape), "dtype": str(w.dtype)}
    if isinstance(pat, pat_lib.NM):
        ax = pat.resolve_axis(w.ndim)
        pat.validate(path, w.shape)
        mv = np.moveaxis(m, ax, -1)
        g = mv.reshape(*mv.shape[:-1], mv.shape[-1] // pat.m, pat.m)
        counts = g.sum(-1)
        if (counts > pat.n).any():
            i = tuple(int(v) for v in np.argwhere(counts > pat.n)[0])
            raise ValueError(
                f"jaxprune: mask of '{path}' is not {pat.n}:{pat.m} along axis {ax}: group {i} "
                f"keeps {int(counts[i])} entries; pack it with pattern='unstructured'"
            )
        wv = np.moveaxis(w, ax, -1).reshape(g.shape)
        # kept positions first (stable), then empty slots marked with m
        order = np.argsort(~g, axis=-1, kind="stable")[..., : pat.n]
        valid = np.take_along_axis(g, order, -1)
        idx = np.where(valid, order, pat.m).astype(np.uint8)
        vals = np.where(valid, np.take_along_axis(wv, order, -1), np.zeros((), w.dtype))
        info.update(format="nm", n=pat.n, m=pat.m, axis=ax)
        return info, {"values": vals, "indices": idx}
    if isinstance(pat, pat_lib.Block):
        pat.validate(path, w.shape)
        k, n = pat_lib._matrix_view(w.shape)
        r, c = pat.r, pat.c
        mb = m.reshape(k // r, r, n // c, c).transpose(0, 2, 1, 3)
        anyb, allb = mb.any((2, 3)), mb.all((2, 3))
        if (anyb != allb).any():
            i = tuple(int(v) for v in np.argwhere(anyb != allb)[0])
            raise ValueError(
                f"jaxprune: mask of '{path}' is not made of whole {r}x{c} blocks (block {i} is "
                "partly kept); pack it with pattern='unstructured'"
            )
        wb = w.reshape(k // r, r, n // c, c).transpose(0, 2, 1, 3)
        info.update(format="block", r=r, c=c, nblocks=[k // r, n // c])
        return info, {"bits": np.packbits(anyb.reshape(-1)), "values": wb[anyb]}
    info.update(format="bitmask")
    return info, {"bits": np.packbits(m.reshape(-1)), "values": w[m]}


def _unpack_leaf(info: dict[str, Any], arrs: dict[str, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
    size = int(np.prod(shape))
    fmt = info["format"]
    if fmt == "bitmask":
        m = np.unpackbits(np.asarray(arrs["bits"]), count=size).astype(bool)
        w = np.zeros(size, dtype)
        w[m] = np.asarray(arrs["values"])
        return w.reshape(shape), m.reshape(shape)
    if fmt == "nm":
        mm, ax = info["m"], info["axis"]
        idx, vals = np.asarray(arrs["indices"]).astype(np.int64), np.asarray(arrs["values"])
        moved = tuple(np.moveaxis(np.empty(shape, bool), ax, -1).shape)
        gshape = (*moved[:-1], moved[-1] // mm, mm)
        ng = int(np.prod(gshape[:-1]))
        idx2, vals2 = idx.reshape(ng, -1), vals.reshape(ng, -1)
        valid = idx2 < mm  # slots holding m are empty
        rows = np.broadcast_to(np.arange(ng)[:, None], idx2.shape)
        g = np.zeros((ng, mm), bool)
        wv = np.zeros((ng, mm), dtype)
        g[rows[valid], idx2[valid]] = True
        wv[rows[valid], idx2[valid]] = vals2[valid]
        m = np.moveaxis(g.reshape(moved), -1, ax)
        w = np.moveaxis(wv.reshape(moved), -1, ax)
        return np.ascontiguousarray(w), np.ascontiguousarray(m)
    if fmt == "block":
        r, c = info["r"], info["c"]
        kb, nb = info["nblocks"]
        bm = np.unpackbits(np.asarray(arrs["bits"]), count=kb * nb).astype(bool).reshape(kb, nb)
        wb = np.zeros((kb, nb, r, c), dtype)
        wb[bm] = np.asarray(arrs["values"])
        w = wb.transpose(0, 2, 1, 3).reshape(shape)
        m = np.broadcast_to(bm[:, None, :, None], (kb, r, nb, c)).reshape(shape)
        return w, np.ascontiguousarray(m)
    if fmt == "dense":
        return np.asarray(arrs["values"]).reshape(shape).astype(dtype), None
    raise ValueError(f"jaxprune: unknown packed format '{fmt}'")


def pack(params: PyTree, masks: PyTree, pattern: pat_lib.Pattern | str = "unstructured"
         ) -> dict[str, Any]:
    """Pack pruned ``params`` with their ``masks`` into ``{"meta": ..., "arrays": ...}`` (numpy).

    ``pattern`` (or a :class:`~jaxprune.core.patterns.PerLeaf`) picks each leaf's format; a mask that
    does not follow it raises ``ValueError`` naming the path. ``channel`` packs as a bitmask.

    >>> w = jnp.array([[0., 2.], [3., 0.]])
    >>> pk = pack({"w": w}, {"w": w != 0})
    >>> pk["meta"]["leaves"][0]["format"], pk["arrays"]["leaf_0"]["values"].tolist()
    ('bitmask', [2.0, 3.0])
    """
    check_masks(params, masks)
    pattern = pat_lib.parse(pattern)
    leaves: list[dict[str, Any]] = []
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for i, ((path, p), (_, m)) in enumerate(
        zip(leaves_with_paths(params), leaves_with_paths(masks), strict=True)
    ):
        if p is None:
            continue
        w = np.asarray(p)
        if m is None:
            info: dict[str, Any] = {"shape": list(w.shape), "dtype": str(w.dtype),
                                    "format": "dense"}
            arrs = {"values": w}
        else:
            info, arrs = _pack_leaf(path, w, np.asarray(m).astype(bool),
                                    pat_lib.for_path(pattern, path))
        key = f"leaf_{i}"
        info.update(path=path, key=key)
        leaves.append(info)
        arrays[key] = arrs
    return {"meta": {"format_version": FORMAT_VERSION, "leaves": leaves}, "arrays": arrays}


def _rebuild(meta: dict[str, Any], arrays: dict[str, Any], template: PyTree | None
             ) -> tuple[PyTree, PyTree]:
    by_path = {}
    for info in meta["leaves"]:
        by_path[info["path"]] = _unpack_leaf(info, arrays[info["key"]])
    if template is not None:
        spec = {p: jax.ShapeDtypeStruct(tuple(info["shape"]), np.dtype(info["dtype"]))
                for p, info in ((i["path"], i) for i in meta["leaves"])}
        check_structure(template, spec, what="sparse checkpoint")
        flat, treedef = jax.tree_util.tree_flatten(template, is_leaf=_is_none)
        paths = [p for p, _ in leaves_with_paths(template)]
        ps, ms = [], []
        for path, t in zip(paths, flat, strict=True):
            if t is None:
                ps.append(None)
                ms.append(None)
                continue
            w, m = by_path[path]
            ps.append(jnp.asarray(w))
            ms.append(None if m is None else jnp.asarray(m))
        return (jax.tree_util.tree_unflatten(treedef, ps),
                jax.tree_util.tree_unflatten(treedef, ms))
    params: dict[str, Any] = {}
    masks: dict[str, Any] = {}
    for path, (w, m) in by_path.items():
        *parents, last = path.split("/")
        pd, md = params, masks
        for k in parents:
            pd, md = pd.setdefault(k, {}), md.setdefault(k, {})
        pd[last] = jnp.asarray(w)
        md[last] = None if m is None else jnp.asarray(m)
    return params, masks


def unpack(packed: dict[str, Any], template: PyTree | None = None) -> tuple[PyTree, PyTree]:
    """Inverse of :func:`pack`: ``(dense params, masks)``.

    With ``template`` (params of the model, arrays or ``ShapeDtypeStruct``) the result has its
    tree type and a mismatch raises :class:`~jaxprune.io.checkpoint.CheckpointMismatchError`;
    without, nested dicts keyed by path components.

    >>> p, m = unpack(pack({"w": jnp.array([1., 0.])}, {"w": jnp.array([True, False])}))
    >>> p["w"].tolist(), m["w"].tolist()
    ([1.0, 0.0], [True, False])
    """
    return _rebuild(packed["meta"], packed["arrays"], template)


def save_sparse(directory: str | os.PathLike, params: PyTree, masks: PyTree,
                pattern: pat_lib.Pattern | str = "unstructured") -> dict[str, Any]:
    """Write a compact checkpoint of pruned ``params``/``masks`` to ``directory`` (must not exist).

    Returns ``{"bytes": size on disk, "dense_bytes": in-memory size of params + bool masks,
    "ratio": bytes / dense_bytes}``.

    >>> import tempfile
    >>> info = save_sparse(tempfile.mkdtemp() + "/s", {"w": jnp.ones(4)}, {"w": None})
    >>> info["bytes"] > 0
    True
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise FileExistsError(f"jaxprune: sparse checkpoint directory '{directory}' exists")
    packed = pack(params, masks, pattern)
    os.makedirs(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, "arrays"), packed["arrays"])
    tmp = os.path.join(directory, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(packed["meta"], f)
    os.replace(tmp, os.path.join(directory, META_FILE))  # written last: marks completion
    dense = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(params))
    dense += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(masks))
    size = dir_size(directory)
    return {"bytes": size, "dense_bytes": dense, "ratio": size / max(dense, 1)}


def load_sparse(directory: str | os.PathLike, template: PyTree | None = None
                ) -> tuple[PyTree, PyTree]:
    """Read a checkpoint written by :func:`save_sparse` as ``(dense params, masks)``.

    See :func:`unpack` for ``template``. Raises ``FileNotFoundError`` for an incomplete or
    missing checkpoint.
    """
    directory = os.path.abspath(os.fspath(directory))
    meta_file = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_file):
        raise FileNotFoundError(
            f"jaxprune: '{directory}' is not a complete sparse checkpoint (no {META_FILE})"
        )
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"jaxprune: sparse checkpoint '{directory}' has format_version "
            f"{meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    if template is not None:  # fail before reading arrays
        spec = {i["path"]: jax.ShapeDtypeStruct(tuple(i["shape"]), np.dtype(i["dtype"]))
                for i in meta["leaves"]}
        check_structure(template, spec, what="sparse checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        arrays = ckptr.restore(os.path.join(directory, "arrays"))
    arrays = jax.tree.map(np.asarray, arrays)
    return _rebuild(meta, arrays, template)


_ = CheckpointMismatchError  # re-exported for callers catching mismatches here
