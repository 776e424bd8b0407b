"""Export: pruned params + masks + operator map → packed matrix views; the packed model, run at the
operator level, equals the masked dense model for every user model (DenseGeneral, einsum params,
nnx LinearGeneral/Einsum, PyTorch layout) and the reference CNN (convs).

Oracle: ``fn(masked_params, x)`` in XLA. Tolerance ``atol=rtol=1e-5`` (f32; the kernels and the
dense model sum in different orders)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.core import filters
from jaxprune.kernels import export, formats
from jaxprune.zoo.models import CNN
from jaxprune.zoo.models.small import MLP
from tests.user_models import MAKERS

TOL = {"rtol": 1e-5, "atol": 1e-5}
PATTERNS = {"2:4": formats.NMPacked, "block4x8": formats.BlockSparse, "unstructured": formats.Bitmask}


def make_cnn(seed=0):
    model = CNN()
    x = jax.random.normal(jax.random.key(seed + 1), (2, 8, 8, 1))
    params = model.init(jax.random.key(seed), x)["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params, x


MODELS = {**MAKERS, "cnn": make_cnn}
# the CNN's first conv has a 9x32 view (3x3x1 fan-in) and its last dense 10 outputs: no 2:4 / 4x8
CNN_FILTER = filters.All(filters.Name("kernel"), filters.Not(filters.PathRegex("Conv_0|Dense_1")))


def _prune(name, params, om, pattern):
    flt = CNN_FILTER if name == "cnn" and pattern != "unstructured" else None
    return jp.prune(params, None if pattern == "2:4" else 0.5, pattern=pattern, filter=flt, opmap=om)


def _count_kernel_calls(monkeypatch):
    calls = []

    def wrap(f):
        def g(x, w, **kw):
            calls.append(type(w).__name__)
            return f(x, w, **kw)
        return g

    monkeypatch.setattr(export, "nm_matmul", wrap(export.nm_matmul))
    monkeypatch.setattr(export, "block_sparse_matmul", wrap(export.block_sparse_matmul))
    monkeypatch.setattr(export.ref, "matmul_ref", wrap(export.ref.matmul_ref))
    return calls


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_model_equals_masked_model(name, pattern, monkeypatch):
    fn, params, x = MODELS[name]()
    om = jp.operator_map(fn, params, x)
    pruned, masks = _prune(name, params, om, pattern)
    packed = export.pack_params(pruned, masks, om, pattern=pattern)
    pws = [w for w in jax.tree.leaves(packed, is_leaf=lambda v: isinstance(v, export.PackedWeight))
           if isinstance(w, export.PackedWeight)]
    n_masked = sum(m is not None for m in jax.tree.leaves(masks, is_leaf=lambda v: v is None))
    assert len(pws) == n_masked > 0
    for pw in pws:
        assert isinstance(pw.data, PATTERNS[pattern]), pw.path
        assert pw.data.shape == om[pw.path].view_shape  # the matrix view is what is packed
    calls = _count_kernel_calls(monkeypatch)
    y = jax.jit(lambda p, x: export.apply_packed(fn, p, x))(packed, x)
    # every packed weight's matmul/conv ran through the sparse path (each is used once here)
    assert len(calls) == len(pws), (calls, [pw.path for pw in pws])
    np.testing.assert_allclose(np.asarray(y), np.asarray(fn(pruned, x)), **TOL)


def test_dense_general_contraction_axis_is_the_fan_in():
    # the issue: a (d, H, Dh) kernel's contraction axis is 0 (not ndim-2 = 1)
    fn, params, x = MAKERS["gqa"]()
    om = jp.operator_map(fn, params, x)
    pruned, masks = jp.prune(params, None, pattern="2:4", opmap=om)
    packed = export.pack_params(pruned, masks, om, pattern="2:4")
    q = packed["block_0"]["q"]["kernel"]
    assert q.shape == (32, 4, 8) and q.data.shape == (32, 32) and om[q.path].fan_in == (0,)
    np.testing.assert_array_equal(np.asarray(q.dense()), np.asarray(pruned["block_0"]["q"]["kernel"]))
    o = packed["block_0"]["o"]["kernel"]  # (heads, head_dim, d): fan-in (0, 1)
    assert o.data.shape == (32, 32) and om[o.path].fan_in == (0, 1)


def test_kernel_kwargs_and_reference_impl_agree():
    fn, params, x = MAKERS["torch"]()
    om = jp.operator_map(fn, params, x)
    pruned, masks = jp.prune(params, None, pattern="2:4", opmap=om)
    packed = export.pack_params(pruned, masks, om, pattern="2:4")
    run = lambda impl: jax.jit(lambda p, x: export.apply_packed(  # noqa: E731
        fn, p, x, kernel_kwargs={"impl": impl}))(packed, x)
    np.testing.assert_allclose(np.asarray(run("pallas")), np.asarray(run("reference")), **TOL)
    with pytest.raises(ValueError, match="impl must be one of"):
        run("nope")


def test_per_leaf_patterns_and_linen_module():
    model = MLP(features=(16, 8))
    x = jax.random.normal(jax.random.key(2), (3, 64))
    params = model.init(jax.random.key(0), x)["params"]
    om = jp.operator_map(model, params, x)
    pattern = jp.PerLeaf(rules=(("Dense_0", jp.NM(2, 4)),), default=jp.Block(8, 4))
    pruned, masks = jp.prune(params, 0.5, pattern=pattern, opmap=om)
    packed = export.pack_params(pruned, masks, om, pattern=pattern)
    assert isinstance(packed["Dense_0"]["kernel"].data, formats.NMPacked)
    assert isinstance(packed["Dense_1"]["kernel"].data, formats.BlockSparse)
    assert isinstance(packed["Dense_0"]["bias"], jax.Array)  # unmasked leaves stay dense
    y = jax.jit(lambda p, x: export.apply_packed(model, p, x))(packed, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model.apply({"params": pruned}, x)), **TOL)


def test_pack_params_errors_name_the_leaf():
    fn, params, x = MAKERS["torch"]()
    om = jp.operator_map(fn, params, x)
    # masks made without the operator map: N:M along axis 0 = the *output* axis of (out, in)
    _, bad = jp.prune(params, None, pattern="2:4",
                      filter=filters.All(filters.Name("weight"), filters.MinNdim(2)))
    with pytest.raises(ValueError, match=r"leaf 'fc1/weight'.*not 2:4 valid"):
        export.pack_params(params, bad, om, pattern="2:4")
    _, masks = jp.prune(params, None, pattern="2:4", opmap=om)
    with pytest.raises(TypeError, match="opmap must be the model's operator map"):
        export.pack_params(params, masks, "2:4", pattern="2:4")
    with pytest.raises(ValueError, match="does not match"):
        export.pack_params(params, {"fc1": None}, om, pattern="2:4")
    nv = jax.tree.map(lambda m: m, masks, is_leaf=lambda v: v is None)
    nv["ln"]["weight"] = jnp.ones(32, bool)  # a norm scale has no matrix view
    with pytest.raises(ValueError, match=r"leaf 'ln/weight'.*no matrix view"):
        export.pack_params(params, nv, om, pattern="2:4")


def test_apply_packed_refuses_weights_that_are_not_plain_layouts():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    x = jnp.ones((2, 8))
    fn = lambda p, x: x @ (p["w"] * 2.0)  # noqa: E731  the matmul sees 2*w, not w
    om = jp.operator_map(fn, params, x)
    pruned, masks = jp.prune(params, None, pattern="2:4", opmap=om)
    packed = export.pack_params(pruned, masks, om, pattern="2:4")
    with pytest.raises(ValueError, match="'w' reaches its dot_general through ops other than"):
        export.apply_packed(fn, packed, x)


def test_tied_embedding_still_exact_when_packed():
    # a weight both gathered and multiplied: the gather reads the dense reconstruction
    params = {"e": jax.random.normal(jax.random.key(0), (16, 8))}
    toks = jnp.array([[1, 5, 7]])
    fn = lambda p, t: p["e"][t] @ p["e"].T  # noqa: E731
    om = jp.operator_map(fn, params, toks)
    pruned, masks = jp.prune(params, None, pattern="2:4", filter=filters.Name("e"), opmap=om)
    packed = export.pack_params(pruned, masks, om, pattern="2:4")
    y = jax.jit(lambda p, t: export.apply_packed(fn, p, t))(packed, toks)
    np.testing.assert_allclose(np.asarray(y), np.asarray(fn(pruned, toks)), **TOL)


def test_packed_matmul_dispatch():
    w = jnp.arange(16.0).reshape(4, 4)
    mask = jnp.eye(4, dtype=bool)
    x = jnp.ones((2, 4))
    expect = x @ jnp.where(mask, w, 0)
    for p in (formats.pack_nm(w, mask), formats.pack_block(w, mask, (2, 2)),
              formats.pack_bitmask(w, mask)):
        y = jax.jit(export.packed_matmul)(x, p)
        np.testing.assert_allclose(np.asarray(y), np.asarray(expect), rtol=1e-6)


def test_jitted_layer_shared_by_two_weights(monkeypatch):
    # one jitted function called with two weights of equal shape: jax shares its jaxpr (and its
    # equations) between the call sites; each call must use its own packed weight
    layer = jax.jit(lambda x, w: x @ w)
    fn = lambda p, x: layer(jnp.tanh(layer(x, p["a"])), p["b"])  # noqa: E731
    ks = jax.random.split(jax.random.key(0), 3)
    params = {"a": jax.random.normal(ks[0], (8, 8)), "b": jax.random.normal(ks[1], (8, 8))}
    x = jax.random.normal(ks[2], (2, 8))
    om = jp.operator_map(fn, params, x)
    pruned, masks = jp.prune(params, None, pattern="2:4", opmap=om)
    packed = export.pack_params(pruned, masks, om, pattern="2:4")
    calls = _count_kernel_calls(monkeypatch)
    y = jax.jit(lambda p, x: export.apply_packed(fn, p, x))(packed, x)
    assert calls == ["NMPacked", "NMPacked"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(fn(pruned, x)), **TOL)


# ------------------------------------------------------------------------------------------------
# 2:4 + int codes: the quantized sweep's codes packed as NMQuantPacked and run through the kernel
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MAKERS))
def test_quantized_codes_packed_model_equals_dequantized_model(name, monkeypatch):
    from jaxprune import oneshot
    from jaxprune.kernels import quant_formats as QF
    from jaxprune.oneshot.quant import QuantSpec

    fn, params, x = MAKERS[name]()
    om = jp.operator_map(fn, params, x)
    stats = oneshot.calibrate(fn, params, [x])
    q, masks, codes = oneshot.prune_layers(params, stats, oneshot.SparseGPT(quant=QuantSpec(4, 16)),
                                           pattern="2:4", return_codes=True)
    assert set(codes) == {p for p, m in export.mask_lib.leaves_with_paths(masks) if m is not None}
    packed = export.pack_params(q, masks, om, pattern="2:4", codes=codes)
    pws = [w for w in jax.tree.leaves(packed, is_leaf=lambda v: isinstance(v, export.PackedWeight))
           if isinstance(w, export.PackedWeight)]
    assert len(pws) == len(codes) and all(isinstance(pw.data, QF.NMQuantPacked) for pw in pws)
    flat = dict(export.mask_lib.leaves_with_paths(q))
    for pw in pws:  # lossless: the packed codes are the sweep's, dequantized = the returned params
        np.testing.assert_array_equal(np.asarray(pw.dense()), np.asarray(flat[pw.path]))
        c, m, s, _ = QF.unpack_nm_quant(pw.data)
        np.testing.assert_array_equal(np.asarray(c)[np.asarray(m)],
                                      np.asarray(codes[pw.path].codes)[np.asarray(m)])
        assert pw.nbytes < np.asarray(flat[pw.path]).nbytes / 4
    calls = []
    real = export.nm_quant_matmul
    monkeypatch.setattr(export, "nm_quant_matmul", lambda a, w, **kw: calls.append(1) or real(a, w, **kw))
    y = jax.jit(lambda p, x: export.apply_packed(fn, p, x))(packed, x)
    assert len(calls) == len(pws)  # every quantized weight ran through the quantized kernel
    np.testing.assert_allclose(np.asarray(y), np.asarray(fn(q, x)), rtol=1e-4, atol=1e-4)


def test_quantized_codes_errors_name_the_leaf():
    from jaxprune import oneshot
    from jaxprune.oneshot.quant import QuantSpec

    fn, params, x = MAKERS["torch"]()
    om = jp.operator_map(fn, params, x)
    stats = oneshot.calibrate(fn, params, [x])
    meth = oneshot.SparseGPT(quant=QuantSpec(4, 16))
    q, masks, codes = oneshot.prune_layers(params, stats, meth, pattern="2:4", return_codes=True)
    bad = jax.tree.map(lambda v: v, q)
    bad["fc1"]["weight"] = bad["fc1"]["weight"] * 1.001  # not the codes' values any more
    with pytest.raises(ValueError, match="'fc1/weight'.*not the codes' dequantized values"):
        export.pack_params(bad, masks, om, pattern="2:4", codes=codes)
    with pytest.raises(ValueError, match="codes= for \\['fc1/bias'\\]"):
        export.pack_params(q, masks, om, pattern="2:4", codes={"fc1/bias": codes["fc1/weight"]})
    with pytest.raises(ValueError, match="magnitude on 'fc.*' does not quantize"):
        oneshot.prune_layers(params, stats, "magnitude", pattern="2:4", return_codes=True)
    with pytest.raises(TypeError, match="return_codes must be a bool"):
        oneshot.prune_layers(params, stats, meth, pattern="2:4", return_codes="yes")
    q2, m2, c2 = oneshot.prune_layers(params, stats, "gptq", return_codes=True)  # dense int4
    with pytest.raises(ValueError, match="'fc1/weight'.*N:M patterns only"):
        export.pack_params(q2, m2, om, pattern="unstructured", codes=c2)
