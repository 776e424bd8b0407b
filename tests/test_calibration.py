"""Calibration statistics against direct numpy computations (linen Dense/Conv/DenseGeneral, nnx)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxprune.core.masks import leaves_with_paths
from jaxprune.oneshot.calibration import calibrate
from jaxprune.zoo.models.small import CNN, MLP, NnxMLP


def _check(st, x):
    x = np.asarray(x, np.float64)
    np.testing.assert_allclose(st.gram, x.T @ x, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(st.norms, np.linalg.norm(x, axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.var, x.var(0), rtol=1e-3, atol=1e-5)
    assert st.count == x.shape[0]


def test_linen_mlp_streamed():
    model = MLP((16, 8, 3))
    x = jax.random.normal(jax.random.key(0), (10, 12))
    params = model.init(jax.random.key(1), x)["params"]
    st = calibrate(model, params, [x[:4], x[4:]])
    assert set(st) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
    assert set(st) <= {p for p, _ in leaves_with_paths(params)}
    h0 = np.asarray(x)
    h1 = np.maximum(h0 @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"], 0)
    h2 = np.maximum(h1 @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"], 0)
    for k, xi in zip(sorted(st), [h0, h1, h2], strict=True):
        _check(st[k], xi)
    assert calibrate(model, params, [x], gram=False)["Dense_0/kernel"].gram is None


def _im2col(x, kh, kw):
    n, h, w, c = x.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    rows = [xp[:, i:i + kh, j:j + kw, :].reshape(n, -1) for i in range(h) for j in range(w)]
    return np.stack(rows, 1).reshape(-1, kh * kw * c)


def test_linen_conv_patches_in_kernel_order():
    model = CNN((3, 4), hidden=8)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
    params = model.init(jax.random.key(1), x)["params"]
    st = calibrate(model, params, [x])
    _check(st["Conv_0/kernel"], _im2col(np.asarray(x), 3, 3))
    assert st["Conv_0/kernel"].fan_in == 18
    # the Gram in kernel order reproduces the conv output energy: sum_o w_o^T G w_o = ||y||^2
    k = np.asarray(params["Conv_0"]["kernel"]).reshape(18, 3)
    y = jax.lax.conv_general_dilated(x, params["Conv_0"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.einsum("io,ij,jo->", k, st["Conv_0/kernel"].gram, k),
                               float((np.asarray(y) ** 2).sum()), rtol=1e-3)


class _Gen(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 3), name="split")(x)
        return nn.DenseGeneral(4, axis=(-2, -1), name="merge")(h)


def test_linen_dense_general():
    x = jax.random.normal(jax.random.key(0), (5, 7, 6))
    m = _Gen()
    p = m.init(jax.random.key(1), x)["params"]
    st = calibrate(m, p, [x])
    _check(st["split/kernel"], np.asarray(x).reshape(-1, 6))
    h = np.einsum("btd,dhk->bthk", x, p["split"]["kernel"]) + p["split"]["bias"]
    _check(st["merge/kernel"], h.reshape(-1, 6))


def test_nnx_model_keys_match_state_paths():
    model = NnxMLP(12, (16, 3), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (9, 12))
    st = calibrate(model, None, [x])
    paths = {p for p, _ in leaves_with_paths(nnx.state(model, nnx.Param))}
    assert set(st) == {"layers/0/kernel", "layers/1/kernel"} and set(st) <= paths
    _check(st["layers/0/kernel"], x)
    h = np.maximum(np.asarray(model.layers[0](x)), 0)
    _check(st["layers/1/kernel"], h)
    assert nnx.Linear.__call__.__qualname__.startswith("Linear")  # patch undone


def test_bad_batches():
    model = MLP((4,))
    params = model.init(jax.random.key(1), jnp.ones((1, 3)))["params"]
    with pytest.raises(ValueError, match="zero batches"):
        calibrate(model, params, [])
    # batches may differ in shape, but one the model cannot take is named
    with pytest.raises(Exception, match=r"calibration batch 1 \(input shapes \[\(2, 5\)\]\) failed"):
        calibrate(model, params, [jnp.ones((2, 3)), jnp.ones((2, 5))])
    with pytest.raises(TypeError, match="calibration batch 0"):
        calibrate(lambda x: x, params, [jnp.ones((2, 3))])
    with pytest.raises(TypeError, match="linen/nnx Module or a function"):
        calibrate(42, params, [jnp.ones((2, 3))])


class _WordIds:
    """A stand-in tokenizer: [CLS]=1, then each word (an integer) as its id, then [SEP]=2."""

    def encode_batch(self, texts):
        return [type("E", (), {"ids": [1] + [int(w) for w in t.split()] + [2]})() for t in texts]


def _bert_case():
    from jaxprune.zoo.models import bert

    cfg = bert.BertConfig(vocab_size=40, hidden=16, layers=1, heads=2, intermediate=32,
                          max_position=64)
    rng = np.random.default_rng(0)
    texts = [" ".join(str(w) for w in rng.integers(3, 40, n)) for n in (3, 7, 7, 3, 3)]
    model = bert.Bert(cfg)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4)))["params"]
    return bert, cfg, model, params, texts


def test_packed_sentences_calibrate_as_one_sentence_per_row():
    """Sentences packed into rows with segment ids give the statistics of each sentence run alone
    (its own row, no padding, no mask): attention stays in the segment, positions restart."""
    bert, _, model, params, texts = _bert_case()
    packed = bert.calibration_batches(_WordIds(), texts, batch=2, pack=True)
    assert len({x.shape for x, _ in packed}) == 1 and packed[0][0].shape[1] == 16
    assert int(sum(m.max(1).sum() for _, m in packed)) == 5  # one segment per sentence
    got = calibrate(model, params, packed, token_masks=[m for _, m in packed])
    alone = [(np.asarray(e.ids, np.int32)[None], np.ones((1, len(e.ids)), np.int32))
             for e in _WordIds().encode_batch(texts)]
    want = calibrate(model, params, alone)
    assert set(got) == set(want) and len(got) == 6
    for k, st in want.items():
        assert got[k].count == st.count == 33  # real tokens only
        np.testing.assert_allclose(got[k].gram, st.gram, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[k].sum, st.sum, rtol=1e-4, atol=1e-4)


def test_bert_positions_and_bias_match_padding_masks():
    """For a 0/1 padding mask: positions 0..t-1 and key-padding attention, as before packing."""
    from jaxprune.zoo.models import bert

    m = jnp.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(bert.positions(m), np.broadcast_to(np.arange(5), (3, 5)))
    want = np.where(np.asarray(m)[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min)
    np.testing.assert_array_equal(bert.attention_bias(m), np.broadcast_to(want, (3, 1, 5, 5)))
    seg = jnp.array([[1, 1, 2, 2, 2, 3, 0]])
    np.testing.assert_array_equal(bert.positions(seg), [[0, 1, 0, 1, 2, 0, 1]])
    allowed = np.asarray(bert.attention_bias(seg))[0, 0] == 0
    s = np.asarray(seg)[0]
    np.testing.assert_array_equal(allowed[s > 0], (s[:, None] == s[None, :])[s > 0])


def test_embed_texts_length_buckets_equal_fixed_padding():
    bert, _, model, params, texts = _bert_case()
    tok = _WordIds()

    class _Tok(_WordIds):  # embed_texts' fixed padding goes through tokenize(): pad by hand
        def enable_padding(self, length=None, **_):
            self.length = length

        def encode_batch(self, texts):
            n = getattr(self, "length", None) or max(len(t.split()) + 2 for t in texts)
            out = []
            for e in super().encode_batch(texts):
                ids = e.ids + [0] * (n - len(e.ids))
                out.append(type("E", (), {"ids": ids,
                                          "attention_mask": [1] * len(e.ids) + [0] * (n - len(e.ids))})())
            return out

    got = bert.embed_texts(model, params, tok, texts, batch=3)
    want = bert.embed_texts(model, params, _Tok(), texts, batch=3, pad_to=32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
