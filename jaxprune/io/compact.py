"""Compact checkpoints of pruned models: the packed formats of :mod:`jaxprune.kernels.formats`.

Each pruned leaf (mask not ``None``) is packed by the one packer, :mod:`jaxprune.kernels.formats`,
in the format of its pattern:

* ``N:M`` along the contraction axis → :class:`~jaxprune.kernels.formats.NMPacked` (``n`` values +
  position codes per group, any ``m`` up to 65536);
* ``block RxC`` → :class:`~jaxprune.kernels.formats.BlockSparse` (the kept blocks + block indices);
* ``unstructured``, ``channel``, and every leaf the pattern's format cannot hold exactly (N:M along
  another axis, 1-d leaves, an empty group of ``1:2**b``) → :class:`~jaxprune.kernels.formats.Bitmask`
  (1 bit per entry + the kept values).

A leaf that is *already packed* (any of these formats, or
:class:`~jaxprune.kernels.quant_formats.NMQuantPacked`: N:M + integer codes + group scales, e.g. from
``SparseGPT(quant=...).compress`` and :func:`~jaxprune.kernels.quant_formats.pack_nm_quant`) is saved
as it is, bit for bit; its mask leaf must be ``None`` or equal to the mask the format holds.
``None`` array fields (the zero points of symmetric codes) are recorded as ``None``.

Unpruned leaves are stored dense. Restoring gives back *exactly* the params and the masks (a kept
weight that happens to be ``0.0`` stays kept). The directory is one orbax checkpoint with two items:
``meta`` (``JsonSave``: format version, and per leaf its path, shape, dtype, format, the format's
static fields and a CRC-32 per array, verified on load) and ``arrays`` (``StandardSave`` of the
packed formats' array fields), written atomically by orbax.

A compact checkpoint holds only the kept values, so :func:`save_sparse` refuses params that are
nonzero where their mask is off (straight-through training keeps dense weights): apply the masks
first, or save a dense checkpoint with :mod:`jaxprune.io.checkpoint`.

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

import dataclasses
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jaxprune.core import patterns as pat_lib
from jaxprune.core.masks import (
    PyTree,
    check_masks,
    leaves_with_paths,
    path_str,
    tree_map_with_path_masked,
)
from jaxprune.io import integrity
from jaxprune.io.trees import check_structure, dir_size, refuse_nnx_objects
from jaxprune.kernels import formats as F
from jaxprune.kernels import quant_formats as QF

__all__ = ["save_sparse", "load_sparse", "load_packed", "FORMAT_VERSION"]

FORMAT_VERSION = 2
_CLASSES: dict[str, type] = {"nm": F.NMPacked, "block": F.BlockSparse, "bitmask": F.Bitmask,
                             "nm_quant": QF.NMQuantPacked}
_FORMAT_OF = {cls: name for name, cls in _CLASSES.items()}
_PACKED = tuple(_CLASSES.values())


def _is_leaf(x: Any) -> bool:
    return x is None or isinstance(x, _PACKED)


def _packed_dtype(p: Any) -> Any:
    """dtype of the dense weight a packed leaf stands for (dequantized: float32)."""
    return jnp.float32 if isinstance(p, QF.NMQuantPacked) else p.values.dtype


def _packed_mask(p: Any) -> jax.Array:
    return QF.unpack_nm_quant(p)[1] if isinstance(p, QF.NMQuantPacked) else F.to_mask(p)


def _packed_dense(p: Any) -> jax.Array:
    return QF.dequantize(p) if isinstance(p, QF.NMQuantPacked) else F.unpack(p)


def _record(p: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``({"format", "static", "none"}, arrays)`` of a packed format value."""
    fields = dataclasses.fields(p)
    static = {f.name: getattr(p, f.name) for f in fields if not _is_array_field(f)}
    arr = {f.name: getattr(p, f.name) for f in fields if _is_array_field(f)}
    none = sorted(k for k, v in arr.items() if v is None)
    return ({"format": _FORMAT_OF[type(p)], "static": static, "none": none},
            {k: np.asarray(v) for k, v in arr.items() if v is not None})


def _is_array_field(f: dataclasses.Field) -> bool:
    return f.metadata.get("pytree_node", True)


def _pack_leaf(path: str, w: np.ndarray, m: np.ndarray, pat: pat_lib.Pattern) -> F.Packed:
    """The one packer's format for ``pat``, or a :class:`Bitmask` where that format is not exact."""
    if isinstance(pat, pat_lib.NM):
        pat.validate(path, w.shape)
        ax = pat.resolve_axis(w.ndim)
        if w.ndim >= 2 and ax == w.ndim - 2 and pat.m <= 2**16:
            p = F.pack_nm(w, m, pat.n, pat.m)  # raises naming the first group with > n kept
            if np.array_equal(np.asarray(F.to_mask(p)), m):
                return p
        elif not pat_lib.nm_valid(m, pat.n, pat.m, ax):
            raise ValueError(f"mask is not {pat.n}:{pat.m} along axis {ax}; save it with "
                             "pattern='unstructured'")
    elif isinstance(pat, pat_lib.Block) and w.ndim >= 2:
        pat.validate(path, w.shape)
        p = F.pack_block(w, m, (pat.r, pat.c))
        if p.nnz_max == 0:  # orbax cannot save zero-size arrays: one padding block
            p = F.pack_block(w, m, (pat.r, pat.c), nnz_max=1)
        if not np.array_equal(np.asarray(F.to_mask(p)), m):
            raise ValueError(f"mask is not made of whole {pat.r}x{pat.c} blocks; save it with "
                             "pattern='unstructured'")
        return p
    return F.pack_bitmask(w, m, nnz_max=max(1, int(m.sum())))


def _entry(path: str, key: str, w: np.ndarray, m: np.ndarray | None, pat: pat_lib.Pattern,
           drop: dict[str, int] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """JSON record and arrays of one leaf; with ``drop`` (a dict), nonzero values where the mask
    is off are zeroed and counted in ``drop[path]`` instead of refused."""
    dtype = _packed_dtype(w) if isinstance(w, _PACKED) else w.dtype
    info: dict[str, Any] = {"path": path, "key": key, "shape": list(w.shape),
                            "dtype": str(jnp.dtype(dtype))}
    if isinstance(w, _PACKED):  # already packed: saved as it is
        if m is not None and not np.array_equal(m, np.asarray(_packed_mask(w))):
            raise ValueError(f"mask differs from the one its packed {type(w).__name__} holds; "
                             "pass None for a packed leaf")
        rec, arrays = _record(w)
        return info | rec, arrays
    if m is not None and m.shape != w.shape:
        raise ValueError(f"mask shape {m.shape} does not match the param's {w.shape}")
    if w.size == 0:  # orbax cannot store a zero-size array: its shape and dtype are the leaf
        return info | {"format": "empty", "masked": m is not None}, {}
    if m is None:
        return info | {"format": "dense"}, {"value": w}
    off = int(np.count_nonzero(w[~m]))
    if off and drop is not None:
        drop[path] = off
        w = np.where(m, w, np.zeros((), w.dtype))
    elif off:
        raise ValueError(
            f"{off} of its {int((~m).sum())} masked-off entries are nonzero; a compact "
            "checkpoint stores only kept values. Apply the masks first (jaxprune.apply_masks), "
            "pass drop_off_mask=True to zero them, or save a dense checkpoint "
            "(jaxprune.io.checkpoint)"
        )
    rec, arrays = _record(_pack_leaf(path, w, m, pat))
    return info | rec, arrays


def _packed_leaf(info: dict[str, Any], arrays: dict[str, Any]) -> Any:
    """A dense array or a packed format from one leaf's record and arrays."""
    fmt = info["format"]
    if fmt == "dense":
        return jnp.asarray(arrays["value"], jnp.dtype(info["dtype"]))
    if fmt == "empty":
        return jnp.zeros(tuple(info["shape"]), jnp.dtype(info["dtype"]))
    if fmt not in _CLASSES:
        raise ValueError(f"jaxprune: unknown packed format '{fmt}' at '{info['path']}'")
    static = {k: tuple(v) if isinstance(v, list) else v for k, v in info["static"].items()}
    none = dict.fromkeys(info.get("none", ()))
    return _CLASSES[fmt](**{k: jnp.asarray(v) for k, v in arrays.items()}, **none, **static)


def _check_unique_paths(flat: list[tuple[Any, Any]]) -> None:
    """Leaves are stored and restored by their path string: two leaves with one path (a key
    ``"a/b"`` next to ``{"a": {"b": ...}}``) would restore each other's values."""
    seen: dict[str, str] = {}
    for kp, _ in flat:
        path, key = path_str(kp), jax.tree_util.keystr(kp)
        if path in seen:
            raise ValueError(f"jaxprune.io.compact.save_sparse: leaves {seen[path]} and {key} both "
                             f"have the path '{path}'; rename a key (a compact checkpoint stores "
                             "leaves by path)")
        seen[path] = key


def save_sparse(directory: str | os.PathLike, params: PyTree, masks: PyTree, *,
                pattern: pat_lib.Pattern | str = "unstructured",
                drop_off_mask: bool = False) -> dict[str, Any]:
    """Write a compact checkpoint of pruned ``params``/``masks`` to ``directory`` (must not exist).

    ``pattern`` (what the masks were built with; a :class:`~jaxprune.core.patterns.PerLeaf` works)
    picks each leaf's packed format. Raises ``ValueError`` naming the leaf path when a mask does not
    follow its pattern or when a param is nonzero where its mask is off, unless
    ``drop_off_mask=True``: then those values are stored as zeros, a ``UserWarning`` says how many
    were dropped, and the result's ``"dropped"`` maps each such leaf path to its count. Returns
    ``{"bytes": size on disk, "dense_bytes": in-memory size of params + bool masks, "ratio": bytes /
    dense_bytes, "dropped": {path: count}}``.

    >>> import tempfile
    >>> info = save_sparse(tempfile.mkdtemp() + "/s", {"w": jnp.ones(4)}, {"w": None})
    >>> info["bytes"] > 0
    True
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise FileExistsError(f"jaxprune: sparse checkpoint directory '{directory}' exists")
    if not isinstance(drop_off_mask, bool):
        raise TypeError(f"jaxprune.io.compact.save_sparse: drop_off_mask must be True or False, "
                        f"got {drop_off_mask!r}")
    refuse_nnx_objects(params, "save_sparse")
    # already-packed leaves are single leaves, checked against masks by their dense shape
    flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_leaf)
    shapes = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(tuple(x.shape), _packed_dtype(x)) if isinstance(x, _PACKED) else x
        for x in flat])
    check_masks(shapes, masks)
    pattern = pat_lib.parse(pattern)
    dropped: dict[str, int] | None = {} if drop_off_mask else None
    leaves: list[dict[str, Any]] = []
    arrays: dict[str, dict[str, np.ndarray]] = {}
    packed_leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_leaf)[0]
    _check_unique_paths(packed_leaves)
    for i, ((_, p), (path, m)) in enumerate(
        zip(packed_leaves, leaves_with_paths(masks), strict=True)
    ):
        if p is None:
            continue
        key = f"leaf_{i}"
        try:
            info, a = _entry(path, key, p if isinstance(p, _PACKED) else np.asarray(p),
                             None if m is None else np.asarray(m).astype(bool),
                             pat_lib.for_path(pattern, path), dropped)
        except (ValueError, TypeError) as e:
            raise type(e)(f"jaxprune.io.compact.save_sparse: leaf '{path}': {e}") from e
        if a:  # a zero-size leaf has no arrays
            arrays[key] = a
        info["crc"] = {name: integrity._crc(v) for name, v in a.items()}  # verified on load
        leaves.append(info)
    meta = {"format_version": FORMAT_VERSION, "leaves": leaves}
    if not arrays:  # orbax refuses an empty item (only unsaved or zero-size leaves): a placeholder
        arrays["_none"] = {"_": np.zeros(1, np.uint8)}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory, ocp.args.Composite(meta=ocp.args.JsonSave(meta),
                                                 arrays=ocp.args.StandardSave(arrays)))
    dense = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                for x in jax.tree.leaves(shapes))
    dense += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(masks))
    dense += sum(int(np.prod(x.shape)) for (_, x), (_, m) in  # a packed leaf's mask
                 zip(packed_leaves, leaves_with_paths(masks), strict=True)
                 if isinstance(x, _PACKED) and m is None)
    size = dir_size(directory)
    if dropped:
        warnings.warn(f"jaxprune.io.compact.save_sparse: dropped {sum(dropped.values())} nonzero "
                      f"values where the mask is off (drop_off_mask=True): {dropped}", stacklevel=2)
    return {"bytes": size, "dense_bytes": dense, "ratio": size / max(dense, 1),
            "dropped": dict(dropped or {})}


def _read(directory: str | os.PathLike, template: PyTree | None
          ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``({path: leaf record}, {path: dense array or packed format})``; checks ``template`` first."""
    directory = os.path.abspath(os.fspath(directory))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        try:
            meta = ckptr.restore(directory, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise FileNotFoundError(
                f"jaxprune: '{directory}' is not a complete sparse checkpoint ({e})"
            ) from e
        meta = meta["meta"]
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"jaxprune: sparse checkpoint '{directory}' has format_version "
                f"{meta.get('format_version')}, expected {FORMAT_VERSION}"
            )
        infos = {i["path"]: i for i in meta["leaves"]}
        if template is not None:  # fail before reading arrays
            spec = {p: jax.ShapeDtypeStruct(tuple(i["shape"]), jnp.dtype(i["dtype"]))
                    for p, i in infos.items()}
            check_structure(template, spec, what="sparse checkpoint")
        arrays = ckptr.restore(directory, args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore()))["arrays"]
    for path, i in infos.items():  # checkpoints written before checksums existed load unchecked
        for name, want in i.get("crc", {}).items():
            got = integrity._crc(arrays[i["key"]][name])
            if got != want:
                raise integrity.IntegrityError(
                    f"jaxprune: sparse checkpoint '{directory}': array '{name}' of leaf '{path}' "
                    f"is corrupted: its checksum is {got} on load but was {want} when saved (the "
                    "file was changed or damaged on disk)")
    return infos, {p: _packed_leaf(i, arrays.get(i["key"], {})) for p, i in infos.items()}


def _assemble(by_path: dict[str, Any], template: PyTree | None) -> PyTree:
    if template is not None:
        return tree_map_with_path_masked(lambda path, t: None if t is None else by_path[path],
                                         template)
    return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in by_path.items()})


def load_packed(directory: str | os.PathLike, template: PyTree | None = None) -> PyTree:
    """Params of a checkpoint written by :func:`save_sparse`, pruned leaves left packed.

    Pruned leaves are :class:`~jaxprune.kernels.formats.NMPacked` / ``BlockSparse`` / ``Bitmask``
    of the Flax-layout leaf (``kernels.formats.unpack`` restores it exactly), the others dense
    arrays. To run packed, re-pack with :func:`jaxprune.kernels.export.pack_params` and an
    operator map (it packs each weight's traced matrix view). See :func:`load_sparse` for
    ``template``.

    >>> import tempfile, jaxprune as jp
    >>> d = tempfile.mkdtemp() + "/s"
    >>> p, m = jp.prune({"kernel": jnp.arange(1., 17.).reshape(8, 2)}, None, pattern="2:4")
    >>> _ = save_sparse(d, p, m, pattern="2:4")
    >>> type(load_packed(d)["kernel"]).__name__
    'NMPacked'
    """
    return _assemble(_read(directory, template)[1], template)


def load_sparse(directory: str | os.PathLike, template: PyTree | None = None
                ) -> tuple[PyTree, PyTree]:
    """Read a checkpoint written by :func:`save_sparse` as ``(dense params, masks)``.

    With ``template`` (params of the model, arrays or ``ShapeDtypeStruct``) the result has its tree
    type and a mismatch raises :class:`~jaxprune.io.trees.CheckpointMismatchError` before any
    array is read; without, nested dicts keyed by path components. Raises ``FileNotFoundError``
    for a missing or incomplete checkpoint, :class:`~jaxprune.io.integrity.IntegrityError` naming
    the leaf when an array's bytes differ from the CRC-32 recorded at save.

    >>> import tempfile
    >>> d = tempfile.mkdtemp() + "/s"
    >>> _ = save_sparse(d, {"w": jnp.array([1., 0.])}, {"w": jnp.array([True, False])})
    >>> p, m = load_sparse(d)
    >>> p["w"].tolist(), m["w"].tolist()
    ([1.0, 0.0], [True, False])
    """
    infos, packed = _read(directory, template)
    params, masks = {}, {}
    for path, x in packed.items():
        if isinstance(x, _PACKED):
            params[path] = _packed_dense(x).astype(jnp.dtype(infos[path]["dtype"]))
            masks[path] = _packed_mask(x)
        else:
            masked = infos[path].get("masked", False)  # a zero-size leaf that had a mask
            params[path], masks[path] = x, jnp.zeros(x.shape, bool) if masked else None
    return _assemble(params, template), _assemble(masks, template)
