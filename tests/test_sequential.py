"""The sequential driver equals: prune block 1, re-run the model, prune block 2."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxprune.core import filters
from jaxprune.core.masks import leaves_with_paths, path_str
from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.calibration import calibrate
from jaxprune.oneshot.methods import get_method
from jaxprune.oneshot.sequential import BlockSpec, get_path, prune_layers, prune_sequential


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(8, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(name="block_1")(Block(name="block_0")(x))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "sparsegpt+dsnot"])
def test_two_blocks_equal_manual(method):
    fn = get_method(method)
    model = Two()
    xs = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(3)]
    params = model.init(jax.random.key(9), xs[0])["params"]
    blocks = [BlockSpec("block_0", Block()), BlockSpec("block_1", Block())]
    got, masks = prune_sequential(params, blocks, xs, fn, 0.5, progress=False)

    def manual_step(p, prefix):
        st = calibrate(model, p, xs)
        st = {k: v for k, v in st.items() if k.startswith(prefix)}
        return prune_layers(p, st, fn, 0.5)

    p1, _ = manual_step(params, "block_0")
    p2, ms = manual_step(p1, "block_1")
    assert ms["block_0"]["fc1"]["kernel"] is None  # no stats given for block_0 in this step
    for path in ["block_0/fc1/kernel", "block_0/fc2/kernel", "block_1/fc1/kernel"]:
        a, b = path.split("/")[0], path.split("/")[1]
        np.testing.assert_allclose(got[a][b]["kernel"], p2[a][b]["kernel"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(masks["block_1"]["fc2"]["kernel"], ms["block_1"]["fc2"]["kernel"])
    assert masks["block_0"]["fc1"]["bias"] is None
    assert abs(float(1 - masks["block_1"]["fc1"]["kernel"].mean()) - 0.5) < 1e-6


def test_dense_inputs_equal_one_calibration():
    model = Two()
    xs = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(2)]
    params = model.init(jax.random.key(9), xs[0])["params"]
    blocks = [BlockSpec("block_0", Block()), BlockSpec("block_1", Block())]
    fn = get_method("sparsegpt")
    got, _ = prune_sequential(params, blocks, xs, fn, pattern="2:4", dense_inputs=True,
                              progress=False)
    want, _ = prune_layers(params, calibrate(model, params, xs), fn, pattern="2:4")
    np.testing.assert_allclose(got["block_1"]["fc2"]["kernel"], want["block_1"]["fc2"]["kernel"],
                               rtol=1e-5, atol=1e-5)


def test_filter_targets_and_errors():
    model = Two()
    xs = [jax.random.normal(jax.random.key(0), (16, 8))]
    params = model.init(jax.random.key(9), xs[0])["params"]
    blocks = [BlockSpec("block_0", Block()), BlockSpec("block_1", Block())]
    _, masks = prune_sequential(params, blocks, xs, get_method("magnitude"), 0.5,
                                filter=lambda p, w: "fc2" not in p,
                                sparsities={"block_1/fc1/kernel": 0.25}, progress=False)
    assert masks["block_0"]["fc2"]["kernel"] is None
    assert abs(float(1 - masks["block_1"]["fc1"]["kernel"].mean()) - 0.25) < 1e-6
    assert abs(float(1 - masks["block_0"]["fc1"]["kernel"].mean()) - 0.5) < 1e-6
    # a core filter value and a method name work the same
    _, m2 = prune_sequential(params, blocks, xs, "magnitude", 0.5,
                             filter=~filters.PathRegex("fc2"),
                             sparsities={"block_1/fc1/kernel": 0.25}, progress=False)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(m2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="needs an explicit sparsity"):
        prune_sequential(params, blocks, xs, "wanda")
    with pytest.raises(ValueError, match=r"sparsities=.*block_7/fc1/kernel.*not in the params"):
        prune_sequential(params, blocks, xs, "wanda", 0.5, sparsities={"block_7/fc1/kernel": 0.2})
    with pytest.raises(ValueError, match=r"sparsities=.*block_0/fc1/bias.*not calibrated"):
        prune_sequential(params, blocks, xs, "wanda", 0.5, sparsities={"block_0/fc1/bias": 0.2},
                         progress=False)
    with pytest.raises(ValueError, match="block_1/fc1/kernel.*1.0"):
        prune_sequential(params, blocks, xs, "wanda", 0.5, sparsities={"block_1/fc1/kernel": 1.0})
    with pytest.raises(TypeError, match="LayerMethod"):
        prune_sequential(params, blocks, xs, lambda *a, **k: None, 0.5)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        prune_sequential(params, blocks, [], get_method("wanda"), 0.5)
    with pytest.raises(ValueError, match="unknown one-shot method"):
        get_method("nope")
    with pytest.raises(KeyError, match="block_9"):
        prune_sequential(params, [BlockSpec("block_9", Block())], xs, get_method("wanda"), 0.5)


def test_prune_layers_mask_tree_and_gram_from_needs():
    model = Two()
    xs = [jax.random.normal(jax.random.key(0), (16, 8))]
    params = model.init(jax.random.key(9), xs[0])["params"]
    st = calibrate(model, params, xs, gram=False)
    _, masks = prune_layers(params, st, "wanda", pattern="2:4", filter="block_1")
    assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(
        jax.tree.map(lambda _: 0, params))
    assert masks["block_0"]["fc1"]["kernel"] is None and masks["block_1"]["fc1"]["bias"] is None
    assert float(masks["block_1"]["fc2"]["kernel"].mean()) == 0.5
    with pytest.raises(ValueError, match="gram=True"):
        prune_layers(params, st, "sparsegpt", 0.5)
    assert "gram" not in get_method("wanda").needs and "gram" in get_method("wanda+dsnot").needs


# ------------------------------------------------------------------------------------------------
# Acceptance on models written the way other people write them (tests/user_models.py): blocks as
# linen modules (differing by name), nnx modules, and the user's own plain functions.
# ------------------------------------------------------------------------------------------------

def _features(key, shape):
    """Correlated features of very different scales (as real activations are)."""
    d = shape[-1]
    mix = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0]
    scale = np.exp(np.linspace(-2.0, 2.0, d))
    return jax.random.normal(key, shape) @ (np.diag(scale) @ mix).astype(np.float32)


def _user_case(name):
    """``(fn, params, blocks, batches)``: the model function, its params, its blocks and
    calibration batches (the blocks compose to ``fn`` up to the model's head)."""
    import jax.numpy as jnp
    from flax import nnx

    from tests import user_models as um

    fn, params, _ = um.MAKERS[name]()
    key = jax.random.key(7)
    if name == "gqa":
        blocks = [BlockSpec("embed", lambda p, t: jnp.take(p["embedding"], t, axis=0))] + [
            BlockSpec(f"block_{i}", um.GQABlock(name=f"block_{i}")) for i in range(2)]
        batches = [jax.random.randint(jax.random.fold_in(key, i), (2, 8), 0, 64) for i in range(4)]
    elif name == "einsum_mlp":
        blocks = [BlockSpec("", fn)]
        batches = [_features(jax.random.fold_in(key, i), (2, 8, 32)) for i in range(4)]
    elif name == "nnx":
        model = nnx.merge(*_nnx_parts(params))
        blocks = [BlockSpec("inp", model.inp),
                  BlockSpec("mix", model.mix, carry=lambda x, y: jax.nn.relu(y)),
                  BlockSpec("out", model.out)]
        batches = [_features(jax.random.fold_in(key, i), (32, 32)) for i in range(3)]
    else:
        def ln(p, x):
            mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
            return (x - mu) / jnp.sqrt(var + 1e-5) * p["weight"] + p["bias"]

        blocks = [BlockSpec("ln", ln),
                  BlockSpec("fc1", lambda p, x: jax.nn.relu(x @ p["weight"].T + p["bias"])),
                  BlockSpec("fc2", lambda p, x: x @ p["weight"].T + p["bias"])]
        batches = [_features(jax.random.fold_in(key, i), (32, 32)) for i in range(3)]
    return fn, params, blocks, batches


def _nnx_parts(params):
    """The user model's nnx graph with ``params`` (eval mode: Dropout is the identity)."""
    from flax import nnx

    from tests import user_models as um

    model = um.NnxGeneral(nnx.Rngs(0))
    model.eval()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _spans(ctx, paths):
    """``{path: (offset, size)}``: each weight is set to the distinct integers ``offset + 1 …``, so
    that a ``dot_general`` operand holding them tells at each position the weight's flat index
    (whatever reshapes / transposes happened on the way)."""
    flat = dict(leaves_with_paths(ctx))
    off, tagged = 0, {}
    for p in paths:
        n = int(np.size(flat[p]))
        tagged[p] = (off, n)
        off += n
    return tagged


def _set_leaves(params, new):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: new.get(path_str(kp), x), params)


def _dot_outputs_error(fn, ctx, paths, changes, batch):
    """``{path: [‖W X − Ŵ X‖ for Ŵ in changes[path]]}`` on ``batch`` with the model's other params
    at ``ctx``: operands recorded by tests/jaxpr_oracle.py (jax primitives evaluated one by one)."""
    import jax.numpy as jnp

    from tests import jaxpr_oracle as oracle

    flat = dict(leaves_with_paths(ctx))
    spans = _spans(ctx, paths)
    tags = {p: jnp.asarray((o + 1 + np.arange(n)).reshape(np.shape(flat[p])), jnp.float32)
            for p, (o, n) in spans.items()}
    rec_tag = oracle.dot_operands(fn, _set_leaves(ctx, tags), batch)
    rec = oracle.dot_operands(fn, ctx, batch)
    out = {p: [0.0] * len(changes[p]) for p in paths}
    found = set()
    for (tl, tr, dn), (lhs, rhs, _) in zip(rec_tag, rec, strict=True):
        for wi, top in ((0, tl), (1, tr)):
            for p, (o, n) in spans.items():
                idx = top.astype(np.int64) - o - 1
                if not (np.all(top == np.round(top)) and idx.min() >= 0 and idx.max() < n
                        and len(np.unique(idx)) == n):
                    continue
                found.add(p)
                w = np.asarray(flat[p]).reshape(-1)
                np.testing.assert_array_equal((lhs, rhs)[wi], w[idx])  # the recorded operand
                for j, w_new in enumerate(changes[p]):
                    d = jnp.asarray((w - np.asarray(w_new).reshape(-1))[idx])
                    ops = (d, rhs) if wi == 0 else (lhs, d)
                    y = jax.lax.dot_general(*ops, dn, precision=jax.lax.Precision.HIGHEST)
                    out[p][j] += float(np.sum(np.asarray(y, np.float64) ** 2))
    assert found == set(paths), f"no dot_general found for {set(paths) - found}"
    return {p: [float(np.sqrt(e)) for e in v] for p, v in out.items()}


def _magnitude(w):
    """numpy oracle: keep the larger half of ``|w|`` (ties: the lower flat index is kept)."""
    a = np.abs(np.asarray(w)).reshape(-1)
    keep = np.zeros(a.size, bool)
    keep[np.argsort(-a, kind="stable")[: a.size // 2]] = True
    return np.where(keep, np.asarray(w).reshape(-1), 0).reshape(np.shape(w))


@pytest.mark.parametrize("name", ["gqa", "einsum_mlp", "nnx", "torch"])
def test_user_models_sparsegpt_beats_magnitude_on_every_layer(name):
    from tests import user_models as um

    fn, params, blocks, batches = _user_case(name)
    sg, sg_masks = prune_sequential(params, blocks, batches, "sparsegpt", 0.5, progress=False)
    dense = dict(leaves_with_paths(params))
    pruned = {p: m for p, m in leaves_with_paths(sg_masks) if m is not None}
    assert set(pruned) == um.WEIGHTS[name]  # calibration found every matmul weight, nothing else
    sg_w = dict(leaves_with_paths(sg))
    for p, m in pruned.items():
        m = np.asarray(m)
        assert m.shape == np.shape(dense[p]) and m.sum() * 2 == m.size  # exactly 50%
        assert np.all(np.asarray(sg_w[p])[~m] == 0) and np.all(np.asarray(sg_w[p])[m] != 0)
    big = jax.tree.map(lambda *xs: np.concatenate(xs), *batches)  # the same rows, one oracle run
    # block b was calibrated with blocks < b pruned and itself dense: that is where its error counts
    done: dict = {}
    for blk in blocks:
        paths = sorted(p for p in pruned if not blk.path or p.startswith(blk.path + "/"))
        if paths:
            err = _dot_outputs_error(fn, _set_leaves(params, done), paths,
                                     {p: [sg_w[p], _magnitude(dense[p])] for p in paths}, big)
            for p, (e_sg, e_mag) in err.items():
                assert e_sg < e_mag, f"{name} {p}: SparseGPT error {e_sg:.4g} >= magnitude {e_mag:.4g}"
            done.update({p: sg_w[p] for p in paths})


@pytest.mark.parametrize("name", ["gqa", "einsum_mlp", "nnx", "torch"])
def test_user_models_quantized_methods_through_the_driver(name):
    """GPTQ (no sparsity given: quantize only), the joint 2:4 + int4 sweep and OBR, run block by
    block on the user models: the returned codes dequantize to the returned params' traced matrix
    views, every view holds at most 16 distinct values per output column (int4, one group: fan-in
    <= 128), 2:4 along its fan-in where pruned, and GPTQ reconstructs each block's outputs better
    than rounding the dense weights to nearest."""
    import jaxprune as jp
    from jaxprune.oneshot.quant import QuantSpec, RoundToNearest
    from tests import user_models as um

    fn, params, blocks, batches = _user_case(name)
    om = jp.operator_map(fn, params, um.MAKERS[name]()[2])
    dense = dict(leaves_with_paths(params))
    results = {}
    for meth, pattern in (("gptq", "unstructured"), ("sparsegpt+int4", "2:4"), ("obr", "2:4")):
        q, m, codes = prune_sequential(params, blocks, batches, meth, pattern=pattern,
                                       progress=False, return_codes=True)
        masks = {p: v for p, v in leaves_with_paths(m) if v is not None}
        assert set(masks) == um.WEIGHTS[name] == set(codes), meth
        qw = dict(leaves_with_paths(q))
        for p, c in codes.items():  # the codes are the returned params' values, in the traced view
            np.testing.assert_array_equal(np.asarray(c.dequantize()), np.asarray(om[p].to_view(qw[p])))
        for p, mk in masks.items():
            view, mview = np.asarray(om[p].to_view(qw[p])), np.asarray(om[p].to_view(mk))
            assert view.shape[0] <= 128  # one quantization group per column
            for col in range(view.shape[1]):
                assert len(np.unique(view[:, col])) <= 16, (meth, p, col)
            if pattern == "2:4":
                assert nm_valid(mview, 2, 4) and mview.mean() == 0.5, (meth, p)
                assert np.all(view[~mview] == 0)
            else:
                assert mview.all()
        results[meth] = qw
    rtn = {p: RoundToNearest(None, QuantSpec(4))(dense[p], None, name=p)[0]
           for p in um.WEIGHTS[name]}
    done: dict = {}
    big = jax.tree.map(lambda *xs: np.concatenate(xs), *batches)
    for blk in blocks:  # as above: each block's error where it was calibrated
        paths = sorted(p for p in um.WEIGHTS[name] if not blk.path or p.startswith(blk.path + "/"))
        if paths:
            err = _dot_outputs_error(fn, _set_leaves(params, done), paths,
                                     {p: [results["gptq"][p], rtn[p]] for p in paths}, big)
            for p, (e_gptq, e_rtn) in err.items():
                assert e_gptq < e_rtn, f"{name} {p}: GPTQ error {e_gptq:.4g} >= RTN {e_rtn:.4g}"
            done.update({p: results["gptq"][p] for p in paths})


def _count_compiles(make_blocks, params_of, batches):
    n = [0]

    def tick():
        n[0] += 1

    blocks, params = make_blocks(tick), params_of()
    prune_sequential(params, blocks, batches, "wanda", 0.5, progress=False)
    return n[0]


def _linen_blocks(k):
    def make(tick):
        class Counted(nn.Module):
            @nn.compact
            def __call__(self, x):
                tick()  # runs once per trace
                return x + nn.Dense(8, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))

        return [BlockSpec(f"block_{i}", Counted(name=f"block_{i}")) for i in range(k)]

    return make


def test_equal_blocks_compile_once_per_shape():
    from flax import nnx

    xs = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(2)]
    p1 = Block().init(jax.random.key(0), xs[0])["params"]
    params = {f"block_{i}": p1 for i in range(3)}
    # (the last block's forward is skipped: its outputs feed nothing, so compare 2 and 3 blocks)
    one = _count_compiles(_linen_blocks(2), lambda: {f"block_{i}": p1 for i in range(2)}, xs)
    three = _count_compiles(_linen_blocks(3), lambda: params, xs)
    assert one > 0 and three == one  # linen modules differing only by name share the programs
    xs2 = xs + [jax.random.normal(jax.random.key(5), (4, 8))]
    # a second shape: calibration and forward once more (the operator map is traced on one shape)
    assert one < _count_compiles(_linen_blocks(3), lambda: params, xs2) <= 2 * one

    # nnx: equal layers of a model, params = nnx.state(model)
    def make_net(k, count):  # fresh classes per run: nothing cached from the previous run
        class Layer(nnx.Module):
            def __init__(self, rngs):
                self.fc = nnx.Linear(8, 8, rngs=rngs)

            def __call__(self, x):
                count[0] += 1
                return jax.nn.relu(self.fc(x))

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.layers = nnx.List([Layer(rngs) for _ in range(k)])

        return Net(nnx.Rngs(k))

    counts = []
    for k in (2, 3):
        count = [0]
        net = make_net(k, count)
        blocks = [BlockSpec(f"layers/{i}", net.layers[i]) for i in range(k)]
        new, masks = prune_sequential(nnx.state(net), blocks, xs, "wanda", 0.5, progress=False)
        assert [p for p, m in leaves_with_paths(masks) if m is not None] == [
            f"layers/{i}/fc/kernel" for i in range(k)]
        nnx.update(net, new)
        assert float((np.asarray(net.layers[k - 1].fc.kernel[...]) == 0).mean()) == 0.5
        counts.append(count[0])
    assert counts[0] > 0 and counts[1] == counts[0]

    # the user's own function, defined once and used for every block
    calls = [0]

    def make_fn():  # a fresh function object per run: nothing cached from the previous run
        def block_fn(p, x):
            calls[0] += 1
            return jax.nn.relu(x @ p["w"])

        return block_fn

    for k in (2, 3):
        calls[0] = 0
        block_fn = make_fn()
        ps = {f"l{i}": {"w": jax.random.normal(jax.random.key(i), (8, 8))} for i in range(k)}
        prune_sequential(ps, [BlockSpec(f"l{i}", block_fn) for i in range(k)], xs, "wanda", 0.5,
                         progress=False)
        counts.append(calls[0])
    assert counts[2] > 0 and counts[3] == counts[2]


def test_token_masks_equal_unpadded_batches():
    """Variable-length batches, and the same batches padded with a token mask, prune the same."""
    _, params, blocks, _ = _user_case("torch")
    key = jax.random.key(3)
    lens = [5, 8]
    raw = [jax.random.normal(jax.random.fold_in(key, i), (2, n, 32)) for i, n in enumerate(lens)]
    padded = [np.pad(np.asarray(x), ((0, 0), (0, 8 - x.shape[1]), (0, 0)), constant_values=7.0)
              for x in raw]
    tm = [np.arange(8)[None, :].repeat(2, 0) < n for n in lens]
    a, ma = prune_sequential(params, blocks, raw, "sparsegpt", 0.5, progress=False)
    b, mb = prune_sequential(params, blocks, padded, "sparsegpt", 0.5, token_masks=tm,
                             progress=False)
    c, _ = prune_sequential(params, blocks, padded, "sparsegpt", 0.5, progress=False)
    for p in ("fc1/weight", "fc2/weight"):
        np.testing.assert_array_equal(np.asarray(get_path(ma, p)), np.asarray(get_path(mb, p)))
        np.testing.assert_allclose(get_path(a, p), get_path(b, p), rtol=1e-4, atol=1e-5)
    assert not np.allclose(get_path(a, "fc2/weight"), get_path(c, "fc2/weight"))  # padding counts
    with pytest.raises(ValueError, match="1 token masks for 2"):
        prune_sequential(params, blocks, padded, "sparsegpt", 0.5, token_masks=tm[:1])


class _Widths(nn.Module):
    """Layers of shapes (24, 24), (24, 40) and (40, 24) (fan-in, out)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(24, name="q")(x)
        return x + nn.Dense(24, name="down")(nn.relu(nn.Dense(40, name="up")(x)))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_layers_of_equal_width_share_one_program(monkeypatch, pattern):
    """A smaller layer runs in the compiled sweep of a wider-fan-in layer of the same output width
    (rows padded with zero weights and identity rows of U): the same masks and weights as its own
    program, and one program fewer."""
    from jaxprune.oneshot import sparsegpt as sg

    xs = [jax.random.normal(jax.random.key(i), (32, 24)) for i in range(2)]
    params = {"b": _Widths().init(jax.random.key(7), xs[0])["params"]}
    meth = sg.SparseGPT(blocksize=8)  # (24, 24) = 3 blocks, padded to the 5 of (40, 24)
    runs = {}
    for share in (True, False):
        monkeypatch.setattr(sg, "_SHARED_ROWS", {})
        monkeypatch.setattr(sg, "_SHARE_MAX_ROWS", 4096 if share else 0)
        before = sg._sparsegpt_core._cache_size()
        runs[share] = prune_sequential(params, [BlockSpec("b", _Widths())], xs, meth, 0.5,
                                       pattern=pattern, progress=False)
        runs[share] += (sg._sparsegpt_core._cache_size() - before,)
    assert runs[True][2] == 2 and runs[False][2] == 3  # (40|24, 24) shared, (24, 40) alone
    for layer in ("q", "up", "down"):
        p = f"b/{layer}/kernel"
        np.testing.assert_array_equal(np.asarray(get_path(runs[True][1], p)),
                                      np.asarray(get_path(runs[False][1], p)))
        np.testing.assert_allclose(np.asarray(get_path(runs[True][0], p)),
                                   np.asarray(get_path(runs[False][0], p)), rtol=1e-6, atol=1e-6)
    assert abs(float(get_path(runs[True][1], "b/q/kernel").mean()) - 0.5) < 1e-6


def test_shared_rows_policy(monkeypatch):
    """Reuse the smallest compiled row count within 4x of the layer's own; never above 4096."""
    from jaxprune.oneshot import sparsegpt as sg

    monkeypatch.setattr(sg, "_SHARED_ROWS", {})
    assert sg._shared_rows(1536, 384, 128, None) == 1536
    assert sg._shared_rows(384, 384, 128, None) == 1536      # 4x: shared
    assert sg._shared_rows(383, 384, 128, None) == 383       # > 4x: its own program
    assert sg._shared_rows(200, 384, 128, None) == 383       # now within 4x of 383
    assert sg._shared_rows(1000, 384, 128, None) == 1536
    assert sg._shared_rows(384, 1536, 128, None) == 384      # another width: its own
    assert sg._shared_rows(384, 384, 64, None) == 384        # another block size: its own
    assert sg._shared_rows(8192, 384, 128, None) is None     # large layers: never padded
