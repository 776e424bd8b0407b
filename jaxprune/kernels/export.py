"""Inference export: pruned params + masks → packed params, and running any traced model on them.

:func:`pack_params` packs each pruned weight's **matrix view** — the ``(fan_in, out)`` matrix its
matmul or conv actually multiplies, read off the operator map (:mod:`jaxprune.core.opmap`) — with
the packers of :mod:`jaxprune.kernels.formats`: N:M along the fan-in rows
(:class:`~jaxprune.kernels.formats.NMPacked`), blocks of the view
(:class:`~jaxprune.kernels.formats.BlockSparse`), else a
:class:`~jaxprune.kernels.formats.Bitmask`. Each packed leaf is a :class:`PackedWeight` that
remembers its path and matrix view; unpruned leaves stay dense.

:func:`apply_packed` runs the *unmodified* model function on packed params at the operator level:
it traces ``fn`` with dense-shaped abstract params, evaluates the jaxpr
(:func:`jaxprune.core.evaluate.evaluate`) and replaces every ``dot_general`` /
``conv_general_dilated`` whose weight is packed by the data rows
(:func:`~jaxprune.core.evaluate.dot_rows`, :func:`~jaxprune.core.evaluate.conv_rows`) times the
packed view (:func:`packed_matmul`: the Pallas kernels), reshaped to the layout the original
equation produces. ``nn.Dense``, ``nn.DenseGeneral``, ``jnp.einsum`` params, nnx
``LinearGeneral``/``Einsum``, PyTorch ``x @ W.T`` and convs all run packed.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxprune as jp
    >>> model = nn.DenseGeneral((2, 4))                      # kernel (16, 2, 4)
    >>> x = jnp.ones((3, 16))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> om = jp.operator_map(model, params, x)
    >>> pruned, masks = jp.prune(params, None, pattern="2:4", opmap=om)
    >>> packed = pack_params(pruned, masks, om, pattern="2:4")
    >>> y = jax.jit(lambda p, x: apply_packed(model, p, x))(packed, x)
    >>> bool(jnp.allclose(y, model.apply({"params": pruned}, x), atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxprune.core import evaluate as ev
from jaxprune.core import masks as mask_lib
from jaxprune.core import opmap as om_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core import walker as wk
from jaxprune.core.oprules import _regroup
from jaxprune.kernels import formats as F
from jaxprune.kernels import quant_formats as QF
from jaxprune.kernels import reference as ref
from jaxprune.kernels.block_sparse_matmul import block_sparse_matmul
from jaxprune.kernels.nm_matmul import nm_matmul
from jaxprune.kernels.nm_quant_matmul import nm_quant_matmul

__all__ = ["PackedWeight", "pack_params", "packed_matmul", "apply_packed"]

PyTree = Any


@struct.dataclass
class PackedWeight:
    """A pruned leaf packed through its matrix view: ``data`` (a packed format of the ``(fan_in,
    out)`` view) and ``op`` (the leaf's :class:`~jaxprune.core.opmap.LeafOp`: path, shape, view).

    >>> from jaxprune.core.opmap import LeafOp
    >>> lo = LeafOp("w", (4, 8), "matmul", fan_in=(1,), out=(0,))      # PyTorch (out, in)
    >>> pw = PackedWeight(F.pack_bitmask(jnp.ones((8, 4)), jnp.ones((8, 4), bool)), lo)
    >>> pw.path, pw.shape, pw.dense().shape
    ('w', (4, 8), (4, 8))
    """

    data: F.NMPacked | F.BlockSparse | F.Bitmask | QF.NMQuantPacked
    op: om_lib.LeafOp = struct.field(pytree_node=False)

    @property
    def path(self) -> str:
        """The param path this leaf was packed from."""
        return self.op.path

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense leaf's shape."""
        return self.op.shape

    @property
    def dtype(self) -> Any:
        """The weight's dtype (integer codes: their scales' float dtype)."""
        if isinstance(self.data, QF.NMQuantPacked):
            return self.data.scales.dtype
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays."""
        if isinstance(self.data, QF.NMQuantPacked):
            return self.data.nbytes()
        return self.data.nbytes

    def dense(self) -> jax.Array:
        """The dense leaf (pruned entries zero; integer codes dequantized); works under ``jit``."""
        if isinstance(self.data, QF.NMQuantPacked):
            return self.op.from_view(QF.dequantize(self.data))
        return self.op.from_view(F.unpack(self.data))


def _pack_view(view: np.ndarray, mask: np.ndarray, pat: pat_lib.Pattern) -> F.Packed:
    if isinstance(pat, pat_lib.NM):
        return F.pack_nm(view, mask, pat.n, pat.m)  # groups of m rows of the fan-in
    if isinstance(pat, pat_lib.Block):
        return F.pack_block(view, mask, (pat.r, pat.c))
    return F.pack_bitmask(view, mask)


def _pack_codes(path: str, qw: Any, view: np.ndarray, mview: np.ndarray,
                pat: pat_lib.Pattern) -> QF.NMQuantPacked:
    """The :class:`NMQuantPacked` of one leaf's codes, checked against its params and mask."""
    if not isinstance(pat, pat_lib.NM):
        raise ValueError(f"integer codes are packed for N:M patterns only (2:4 + int4/int8), "
                         f"got {pat}")
    for attr in ("codes", "scales", "zeros", "spec"):
        if not hasattr(qw, attr):
            raise TypeError(f"codes must be QuantizedWeight (codes, scales, zeros, spec), got "
                            f"{type(qw).__name__}")
    if tuple(np.shape(qw.codes)) != view.shape:
        raise ValueError(f"codes of shape {tuple(np.shape(qw.codes))} for a matrix view of shape "
                         f"{view.shape}")
    deq = np.asarray(qw.dequantize())
    off = (deq != view) & mview
    if off.any() or np.any(view[~mview] != 0):
        bad = np.argwhere(off)[:1].tolist() or np.argwhere((view != 0) & ~mview)[:1].tolist()
        raise ValueError(f"the params are not the codes' dequantized values (first mismatch at "
                         f"view index {tuple(bad[0])}); pass the params returned with the codes")
    k = view.shape[0]
    g = qw.spec.group_size or k
    return QF.pack_nm_quant(qw.codes, mview, qw.scales, qw.zeros, bits=qw.spec.bits,
                            group_size=k if g >= k else g, n=pat.n, m=pat.m)


def pack_params(params: PyTree, masks: PyTree, opmap: om_lib.OperatorMap, *,
                pattern: pat_lib.Pattern | str, codes: dict[str, Any] | None = None) -> PyTree:
    """Packed copy of ``params``: each leaf with a mask becomes a :class:`PackedWeight`.

    Args:
      params: pruned params (the ones the masks were made for).
      masks: the mask tree (``None`` leaves stay dense).
      opmap: the operator map of the model (``jaxprune.operator_map(fn, params, x)``), the one the
        masks were made with (``jaxprune.prune(..., opmap=om)``); it gives each weight's matrix view.
      pattern: what the masks were built with (a spec, a pattern or a
        :class:`~jaxprune.core.patterns.PerLeaf`): N:M → ``NMPacked`` (groups of ``m`` fan-in rows of
        the view), block → ``BlockSparse`` (blocks of the view), anything else → ``Bitmask``.
      codes: ``{path: QuantizedWeight}`` of quantized leaves (``prune_layers`` /
        ``prune_sequential(..., return_codes=True)``): those become
        :class:`~jaxprune.kernels.quant_formats.NMQuantPacked` (N:M + int codes + group scales;
        :func:`apply_packed` runs them through ``nm_quant_matmul``). The params must be the codes'
        dequantized values, exactly.

    Raises ``ValueError`` naming the leaf path when a mask does not fit its pattern on the view, or a
    pruned leaf has no matrix view; ``TypeError`` when ``opmap`` is not an operator map.

    >>> import jaxprune as jp
    >>> fn = lambda p, x: x @ p["w"].T + p["b"]                       # PyTorch layout (out, in)
    >>> params = {"w": jnp.arange(32.).reshape(4, 8), "b": jnp.ones(4)}
    >>> om = jp.operator_map(fn, params, jnp.ones((1, 8)))
    >>> p, m = jp.prune(params, None, pattern="2:4", opmap=om)
    >>> packed = pack_params(p, m, om, pattern="2:4")
    >>> type(packed["w"].data).__name__, packed["w"].data.shape, type(packed["b"]).__name__
    ('NMPacked', (8, 4), 'ArrayImpl')
    """
    if not isinstance(opmap, om_lib.OperatorMap):
        raise TypeError(
            "jaxprune.kernels.pack_params(params, masks, opmap, pattern=...): opmap must be the "
            f"model's operator map (jaxprune.operator_map(fn, params, x)), got {type(opmap).__name__}"
        )
    mask_lib.check_masks(params, masks)
    pattern = pat_lib.parse(pattern)
    codes = dict(codes or {})
    masked = {p for p, m in mask_lib.leaves_with_paths(masks) if m is not None}
    stray = sorted(set(codes) - masked)
    if stray:
        raise ValueError(f"jaxprune.kernels.pack_params: codes= for {stray}, which are not pruned "
                         f"leaves (leaves with a mask: {sorted(masked)})")

    def one(path: str, w: Any, m: Any) -> Any:
        if m is None or w is None:
            return w
        try:
            lo = opmap[path]
        except KeyError:
            raise ValueError(f"jaxprune.kernels.pack_params: leaf '{path}' is not in the operator "
                             "map; build it from the same params") from None
        if not lo.has_view or lo.shape != tuple(np.shape(w)):
            raise ValueError(
                f"jaxprune.kernels.pack_params: leaf '{path}' (shape {tuple(np.shape(w))}) has no "
                f"matrix view in the operator map (role '{lo.role}', shape {lo.shape}); only matmul "
                "and conv weights can be packed, leave it out of the masks"
            )
        grouped = sorted({u.groups for u in lo.uses if u.groups != 1})
        if grouped:
            raise ValueError(
                f"jaxprune.kernels.pack_params: leaf '{path}' is a grouped conv "
                f"(feature_group_count {grouped[0]}); packed kernels run ungrouped convs and "
                "matmuls only, leave it out of the masks (it stays dense)"
            )
        try:
            view = np.asarray(lo.to_view(F._concrete(w, "weight")))
            mview = np.asarray(lo.to_view(F._concrete(m, "mask")))
            pat = pat_lib.for_path(pattern, path)
            if path in codes:
                return PackedWeight(_pack_codes(path, codes[path], view, mview, pat), lo)
            return PackedWeight(_pack_view(view, mview, pat), lo)
        except (ValueError, TypeError) as e:
            raise type(e)(f"jaxprune.kernels.pack_params: leaf '{path}' (matrix view "
                          f"{lo.view_shape}): {e}") from e

    return mask_lib.tree_map_with_path_masked(one, params, masks)


def packed_matmul(x: jax.Array, w: Any, **kwargs: Any) -> jax.Array:
    """``x @ W`` over ``W``'s matrix view for any packed format (kernels) or a dense array.

    ``kwargs`` go to the kernel (``impl``, ``variant``, ``interpret``). :class:`Bitmask` weights
    (unstructured) have no kernel: they are decompressed in XLA.

    >>> packed_matmul(jnp.ones((1, 2)), jnp.ones((2, 3)))
    Array([[2., 2., 2.]], dtype=float32)
    """
    if isinstance(w, PackedWeight):
        w = w.data
    if isinstance(w, F.NMPacked):
        return nm_matmul(x, w, **kwargs)
    if isinstance(w, QF.NMQuantPacked):
        return nm_quant_matmul(x, w, **{k: v for k, v in kwargs.items()
                                        if k in ("impl", "interpret", "tiles")})
    if isinstance(w, F.BlockSparse):
        return block_sparse_matmul(x, w, **kwargs)
    return ref.matmul_ref(x, w)


# ------------------------------------------------------------------------------------------------
# Which matmul operands are a packed weight itself, up to layout (reshape, transpose, dtype)
# ------------------------------------------------------------------------------------------------

_LAYOUT = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "pvary", "mesh_cast",
           "reshard"}


def _layout_rules(seen: dict[int, list[list[Any]]]) -> dict[str, wk.Rule]:
    """Values: ``None`` or ``(path, axes)`` — the array is leaf ``path`` in another layout, its axis
    ``i`` being the param axes ``axes[i]`` flattened in row-major order."""
    def same(e, ins):
        return [ins[0]]

    def transpose(e, ins):
        v = ins[0]
        return [None if v is None else (v[0], tuple(v[1][i] for i in e.params["permutation"]))]

    def reshape(e, ins):
        v = ins[0]
        groups = None if v is None else _regroup(e.in_shapes[0], e.out_shapes[0])
        if groups is None:
            return [None]
        out: list[tuple[int, ...]] = [() for _ in e.out_shapes[0]]
        for gi, gj in groups:
            ax = tuple(a for i in gi for a in v[1][i])
            if len(gj) > 1 and len(ax) > 1:  # splitting a merged axis: give up on exactness
                return [None]
            for j in gj:
                out[j] = ax if e.out_shapes[0][j] > 1 else ()
        return [(v[0], tuple(out))]

    def squeeze(e, ins):
        v = ins[0]
        if v is None:
            return [None]
        nd = len(e.in_shapes[0])
        dims = {d % nd for d in e.params["dimensions"]}
        return [(v[0], tuple(a for i, a in enumerate(v[1]) if i not in dims))]

    def broadcast(e, ins):  # only adding size-1 axes keeps the values
        v = ins[0]
        oshape = e.out_shapes[0]
        dims = e.params["broadcast_dimensions"]
        if v is None or any(d > 1 for j, d in enumerate(oshape) if j not in dims) or \
                any(e.in_shapes[0][i] != oshape[j] for i, j in enumerate(dims)):
            return [None]
        out: list[tuple[int, ...]] = [() for _ in oshape]
        for i, j in enumerate(dims):
            out[j] = v[1][i]
        return [(v[0], tuple(out))]

    def record(e, ins):  # per visit: a jitted function's jaxpr is shared by all its call sites
        seen.setdefault(id(e.eqn), []).append(list(ins))
        return [None]

    rules: dict[str, wk.Rule] = {n: same for n in _LAYOUT}
    rules.update(transpose=transpose, reshape=reshape, squeeze=squeeze, broadcast_in_dim=broadcast,
                 expand_dims=lambda e, ins: reshape(e, ins), dot_general=record,
                 conv_general_dilated=record)
    return rules


def _flat(axes: tuple[tuple[int, ...], ...], dims: Any) -> tuple[int, ...]:
    out: list[int] = []
    for d in dims:
        for a in axes[d]:
            if not out or out[-1] != a:
                out.append(a)
    return tuple(out)


def _check_operand(eqn: Any, v: Any, opi: int, pw: PackedWeight) -> None:
    lo, path = pw.op, pw.path
    if v is None or v[0] != path:
        raise ValueError(
            f"jaxprune.kernels.apply_packed: packed weight '{path}' reaches its "
            f"{eqn.primitive.name} through ops other than reshape/transpose/dtype conversion (or "
            "combined with other arrays); it cannot run packed"
        )
    if lo.batch:
        raise ValueError(f"jaxprune.kernels.apply_packed: '{path}' has batch axes {lo.batch} "
                         "(stacked experts / scanned layers); batched packed weights are not supported")
    if eqn.primitive.name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        c = lc if opi == 0 else rc
        nd = len(v[1])
        fan, out = _flat(v[1], c), _flat(v[1], [i for i in range(nd) if i not in c])
    else:
        out_d, in_d, *sp = eqn.params["dimension_numbers"].rhs_spec
        fan, out = _flat(v[1], [*sp, in_d]), _flat(v[1], [out_d])
    if (fan, out) != (lo.fan_in, lo.out):
        raise ValueError(
            f"jaxprune.kernels.apply_packed: '{path}' is multiplied with fan-in axes {fan} and "
            f"output axes {out} but was packed with fan-in {lo.fan_in} and outputs {lo.out}"
        )


def _packed_eqn(eqn: Any, ins: list[Any], opi: int, pw: PackedWeight, kw: dict) -> list[Any]:
    """The outputs of a tapped equation, computed with the packed weight."""
    out_aval = eqn.outvars[0].aval
    dt = pw.dtype
    if eqn.primitive.name == "dot_general":
        rows, free = ev.dot_rows(eqn, ins[1 - opi], opi, pw.path)
        (lc, rc), _ = eqn.params["dimension_numbers"]
        c = lc if opi == 0 else rc
        wshape = wk.shape_of(eqn.invars[opi])
        wfree = tuple(d for i, d in enumerate(wshape) if i not in c)
        y = packed_matmul(rows.astype(dt), pw.data, **kw).reshape(*free, *wfree)
        if opi == 0:  # dot_general output: lhs (the weight) free dims first
            nf = len(free)
            y = jnp.transpose(y, [*range(nf, nf + len(wfree)), *range(nf)])
    else:
        rows, free = ev.conv_rows(eqn, ins[0], wk.shape_of(eqn.invars[1]), pw.path)
        y = packed_matmul(rows.astype(dt), pw.data, **kw).reshape(*free, -1)
        y = jnp.moveaxis(y, -1, eqn.params["dimension_numbers"].out_spec[1])
    return [y.astype(out_aval.dtype)]


def apply_packed(fn: Any, packed_params: PyTree, *args: Any, kernel_kwargs: dict | None = None
                 ) -> Any:
    """``fn(params, *args)`` with every packed weight's matmul/conv run by the sparse kernels.

    ``fn`` is any JAX function of ``(params, *args)`` or a linen ``Module`` (applied as
    ``module.apply({"params": params}, *args)``; nnx: ``lambda s, x: nnx.merge(graphdef, s)(x)``);
    ``packed_params`` comes from :func:`pack_params`. Works under ``jax.jit`` (call it there: the
    kernels run in interpret mode on CPU). ``kernel_kwargs`` go to the kernels (``impl``,
    ``variant``, ``interpret``, ``tiles``); ``impl="pallas"`` lets kernel errors propagate.

    Raises ``ValueError`` naming the weight when a packed weight reaches its matmul through anything
    but layout ops, is batched, or is used inside ``scan``/``cond``/``while``.

    >>> import jaxprune as jp
    >>> fn = lambda p, x: jnp.einsum("bd,hd->bh", x, p["w"])        # w (out, in)
    >>> params = {"w": jax.random.normal(jax.random.key(0), (4, 8))}
    >>> om = jp.operator_map(fn, params, jnp.ones((2, 8)))
    >>> p, m = jp.prune(params, None, pattern="2:4", opmap=om)
    >>> packed = pack_params(p, m, om, pattern="2:4")
    >>> y = jax.jit(lambda q, x: apply_packed(fn, q, x))(packed, jnp.ones((2, 8)))
    >>> bool(jnp.allclose(y, fn(p, jnp.ones((2, 8))), atol=1e-5))
    True
    """
    is_pw = lambda x: isinstance(x, PackedWeight)  # noqa: E731
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_pw(x) else
                            jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
                            packed_params, is_leaf=is_pw)
    packed = {x.path: x for x in jax.tree.leaves(packed_params, is_leaf=is_pw) if is_pw(x)}
    closed, an, _ = om_lib.trace(fn, abstract, *args)
    # packed leaves enter as their dense reconstruction: whatever else reads them (a tied embedding's
    # gather) stays exact, and under jit XLA drops it where only replaced matmuls used it
    leaves = jax.tree.leaves(jax.tree.map(lambda x: x.dense() if is_pw(x) else x, packed_params,
                                          is_leaf=is_pw))
    seen: dict[int, list[list[Any]]] = {}
    walker = wk.Walker(_layout_rules(seen), data=lambda shape: None,
                       sources=lambda v: [] if v is None else [v[0]],
                       default=lambda e, ins: [None for _ in e.out_shapes])
    walker.run(closed.jaxpr, [(p, tuple((i,) if d > 1 else () for i, d in enumerate(x.shape)))
                              for p, x in mask_lib.leaves_with_paths(abstract)]
               + [None] * (len(closed.jaxpr.invars) - len(leaves)), closed.consts)
    kw = dict(kernel_kwargs or {})

    visits: dict[int, int] = {}

    def hook(eqn: Any, ins: list[Any], taps: list[tuple[int, str, bool]]) -> list[Any] | None:
        # the layout walker visited the equations in the same order as evaluate does: its values
        # for this visit say which param (if any) each operand is
        i = visits[id(eqn)] = visits.get(id(eqn), -1) + 1
        vals = seen.get(id(eqn), [])[i] if i < len(seen.get(id(eqn), [])) else [None, None]
        hits = [(opi, v[0]) for opi, v in enumerate(vals[:2]) if v is not None and v[0] in packed]
        if not hits:
            lost = [p for opi, p, _ in taps if p in packed and vals[opi] is None]
            if lost:
                _check_operand(eqn, None, 0, packed[lost[0]])  # raises, naming the weight
            return None
        opi, path = hits[0]
        if len(hits) > 1:
            raise ValueError(f"jaxprune.kernels.apply_packed: packed weights {[p for _, p in hits]} "
                             f"multiply each other in one {eqn.primitive.name}")
        _check_operand(eqn, vals[opi], opi, packed[path])
        return _packed_eqn(eqn, ins, opi, packed[path], kw)

    outs = ev.evaluate(closed.jaxpr, closed.consts, [*leaves, *jax.tree_util.tree_leaves(args)],
                       an.taps, hook)
    out_tree = jax.tree_util.tree_structure(jax.eval_shape(om_lib._as_fn(fn), abstract, *args))
    return jax.tree_util.tree_unflatten(out_tree, outs)
