"""One-shot pruning on models a user writes themselves (no zoo models), checked against numpy
oracles: the statistics equal the rows the weight really multiplies, masks and sparsities are what
was asked, and bad inputs fail with errors that name the problem."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxprune import oneshot
from jaxprune.core.opmap import OperatorMapError

K = jax.random.key


class _Attn(nn.Module):
    """DenseGeneral attention: q/k/v (d, heads, head_dim), out (heads, head_dim, d)."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 4), axis=-1, name="q")(x)
        k = nn.DenseGeneral((2, 4), axis=-1, name="k")(x)
        v = nn.DenseGeneral((2, 4), axis=-1, name="v", use_bias=False)(x)
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v)
        return nn.DenseGeneral(8, axis=(-2, -1), name="o")(o)


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _attn_calibrated(batch: int, t: int, gram: bool = True):
    """The DenseGeneral attention model, its params, stats and each layer's input rows."""
    m = _Attn()
    x = jax.random.normal(K(1), (batch, t, 8))
    p = m.init(K(0), x)["params"]
    return m, x, p, oneshot.calibrate(m, p, [x], gram=gram), oneshot.layer_inputs(m, p, x)


def test_densegeneral_attention_masks_follow_the_fan_in():
    m, x, p, st, rows = _attn_calibrated(4, 5)
    # oracle: the out projection multiplies the attention output flattened over (heads, head_dim)
    np.testing.assert_allclose(st["o/kernel"].gram, np.asarray(rows["o/kernel"]).T @ rows["o/kernel"],
                               rtol=1e-4, atol=1e-4)
    for meth in ("wanda", "sparsegpt"):
        newp, masks = oneshot.prune_layers(p, st, meth, pattern="2:4")
        for path in ("q/kernel", "k/kernel", "v/kernel", "o/kernel"):
            mk, w = np.asarray(_leaf(masks, path)), np.asarray(_leaf(newp, path))
            assert np.all(w[~mk] == 0)
            mv = np.asarray(st[path].view.to_view(mk))  # (fan_in, out)
            assert np.all(mv.reshape(-1, 4, mv.shape[1]).sum(1) == 2), (meth, path)
        assert np.isfinite(np.asarray(m.apply({"params": newp}, x))).all()


def test_torch_layout_einsum_wanda_scores_equal_hand_oracle():
    def fn(p, x):  # (h, d, k) einsum weight and a PyTorch (out, in) weight used as h @ W.T
        h = jnp.tanh(jnp.einsum("btd,hdk->bthk", x, p["wq"]).reshape(x.shape[:2] + (12,)))
        return h @ p["wt"].T

    p = {"wq": jax.random.normal(K(2), (3, 8, 4)), "wt": jax.random.normal(K(3), (8, 12))}
    x = jax.random.normal(K(1), (2, 5, 8))
    st = oneshot.calibrate(fn, p, [x, 2 * x])
    xs = np.concatenate([np.asarray(x), 2 * np.asarray(x)])
    h = np.tanh(np.einsum("btd,hdk->bthk", xs, np.asarray(p["wq"]))).reshape(-1, 12)
    w = np.asarray(p["wt"]).T  # (in, out)
    score = np.abs(w) * np.linalg.norm(h, axis=0)[:, None]
    want = np.zeros(w.shape, bool)
    for o in range(w.shape[1]):
        want[np.argsort(-score[:, o], kind="stable")[:6], o] = True
    _, mk = oneshot.Wanda()(p["wt"], st["wt"], 0.5)
    np.testing.assert_array_equal(np.asarray(mk).T, want)


def test_sparsegpt_and_obs_beat_magnitude_on_reconstruction():
    m, x, p, st, rows = _attn_calibrated(8, 6)
    errs = {}
    for meth in ("magnitude", "sparsegpt", "obs"):
        newp, _ = oneshot.prune_layers(p, st, meth, 0.5)
        for path in ("q/kernel", "o/kernel"):
            X = np.asarray(rows[path], np.float64)
            w0 = np.asarray(st[path].view.to_view(_leaf(p, path)), np.float64)
            w1 = np.asarray(st[path].view.to_view(_leaf(newp, path)), np.float64)
            errs[meth, path] = np.linalg.norm(X @ (w0 - w1)) ** 2
    for path in ("q/kernel", "o/kernel"):
        assert errs["sparsegpt", path] < errs["magnitude", path]
        assert errs["obs", path] < errs["magnitude", path]


def test_flipped_weight_statistics_are_in_the_weights_order():
    """A weight reversed on its way to the matmul (``w[::-1]``, a flipped conv kernel as in
    ``ConvTranspose(transpose_kernel=True)``): the rows must be mapped back to the weight's own
    entries (they used to be attributed to the mirrored entries, silently)."""
    x = jax.random.normal(K(1), (16, 8)) * jnp.arange(1, 9)  # inputs of very different scales
    st = oneshot.calibrate(lambda p, x: x @ p["w"][::-1], {"w": jnp.ones((8, 3))}, [x])
    xr = np.asarray(x)[:, ::-1]  # input j multiplies w[7 - j]
    np.testing.assert_allclose(st["w"].sumsq, (xr * xr).sum(0), rtol=1e-5)
    np.testing.assert_allclose(st["w"].gram, xr.T @ xr, rtol=1e-5, atol=1e-3)

    conv = nn.ConvTranspose(6, (3, 3), strides=(2, 2), use_bias=False, transpose_kernel=True)
    xi = jax.random.normal(K(2), (2, 5, 5, 4))
    w = conv.init(K(0), xi)["params"]["kernel"]
    fn = lambda p, xx: conv.apply({"params": {"kernel": p["w"]}}, xx)  # noqa: E731
    st = oneshot.calibrate(fn, {"w": w}, [xi])["w"]
    rows = np.asarray(oneshot.layer_inputs(fn, {"w": w}, xi)["w"])
    wv = np.asarray(st.view.to_view(w))
    y = np.asarray(fn({"w": w}, xi)).reshape(-1, wv.shape[1])
    np.testing.assert_allclose(rows @ wv, y, rtol=1e-4, atol=1e-4)  # rows x view = the conv
    np.testing.assert_allclose(st.gram, rows.T @ rows, rtol=1e-4, atol=1e-3)


def test_sliced_or_padded_fan_in_is_refused_naming_the_layer():
    x = jax.random.normal(K(1), (6, 8))
    for fn in (lambda p, x: x[:, :4] @ p["w"][:4],
               lambda p, x: jnp.pad(x, ((0, 0), (0, 2))) @ jnp.pad(p["w"], ((0, 2), (0, 0)))):
        p = {"w": jax.random.normal(K(2), (8, 3)), "u": jax.random.normal(K(3), (8, 3))}
        st = oneshot.calibrate(lambda p, x: fn(p, x) + x @ p["u"], p, [x])
        for meth in ("sparsegpt", "wanda"):
            with pytest.raises(ValueError, match="'w'.*sliced, padded or concatenated"):
                oneshot.prune_layers(p, st, meth, 0.5)
        _, masks = oneshot.prune_layers(p, st, "sparsegpt", 0.5, filter=lambda path, _: path == "u")
        assert masks["w"] is None and float(1 - masks["u"].mean()) == 0.5


def test_tied_weight_used_both_ways_gets_the_operator_map_error():
    def fn(p, x):
        return jnp.tanh(x @ p["w"]) @ p["w"].T  # (8, 6) used as x @ W and h @ W.T
    with pytest.raises(OperatorMapError, match="'w'.*incompatible"):
        oneshot.calibrate(fn, {"w": jnp.ones((8, 6))}, [jnp.ones((4, 8))])


def test_shared_weight_sums_both_uses():
    d = nn.Dense(8, use_bias=False)
    m = nn.Sequential([d, jnp.tanh, d])
    x = jax.random.normal(K(1), (6, 8))
    p = m.init(K(0), x)["params"]
    (path, st), = oneshot.calibrate(m, p, [x]).items()
    h = np.tanh(np.asarray(x) @ np.asarray(_leaf(p, path)))
    xs = np.concatenate([np.asarray(x), h])
    assert st.count == 12
    np.testing.assert_allclose(st.gram, xs.T @ xs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("meth", ["sparsegpt", "obs", "sparsegpt+dsnot", "gptq"])
def test_sparsity_that_rounds_to_a_dead_layer_is_refused(meth):
    x = jax.random.normal(K(1), (16, 6))
    st = oneshot.LayerStats.from_inputs(np.asarray(x))
    w = jax.random.normal(K(2), (6, 8))  # 48 weights: 0.99 * 48 rounds to all 48
    with pytest.raises(ValueError, match="prunes all of 'fc'"):
        oneshot.get_method(meth)(w, st, 0.99, name="fc")
    _, mk = oneshot.get_method(meth)(w, st, 0.97, name="fc")  # 47 of 48
    assert int(np.asarray(mk).sum()) == 1


def test_zero_tokens_are_refused_not_a_zeroed_layer():
    m = nn.Dense(4)
    x = jax.random.normal(K(1), (16, 8))
    p = m.init(K(0), x)["params"]
    with pytest.raises(ValueError, match="no tokens"):
        oneshot.calibrate(m, p, [x], token_masks=[jnp.zeros(16)])
    st = oneshot.LayerStats(np.zeros((8, 8), np.float32), np.zeros(8, np.float32),
                            np.zeros(8, np.float32), 0, 8)
    for meth in ("sparsegpt", "obs", "wanda"):  # SparseGPT used to zero every kept weight
        with pytest.raises(ValueError, match="'fc'.*no tokens"):
            oneshot.get_method(meth)(p["kernel"], st, 0.5, name="fc")


def test_prune_layers_argument_errors():
    m = nn.Dense(4)
    x = jax.random.normal(K(1), (16, 8))
    p = m.init(K(0), x)["params"]
    st = oneshot.calibrate(m, p, [x])
    with pytest.raises(TypeError, match="LayerStats"):
        oneshot.prune_layers(p, list(st.values()), "wanda", 0.5)
    with pytest.warns(UserWarning, match="no layer was pruned"):
        _, masks = oneshot.prune_layers(p, st, "wanda", 0.5, filter="nothing-matches")
    assert masks["kernel"] is None


def test_owl_sparsities_accepts_the_params_tree():
    m, x, p, st, _ = _attn_calibrated(4, 5, gram=False)
    flat = {k: _leaf(p, k) for k in st}
    assert oneshot.owl_sparsities(p, st, 0.5, M=1.5) == oneshot.owl_sparsities(flat, st, 0.5, M=1.5)


def test_grouped_strided_conv_and_bf16():
    class C(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), strides=2, padding="SAME", param_dtype=jnp.bfloat16,
                        name="c")(x)
            return nn.Conv(8, (3, 3), feature_group_count=4, use_bias=False, name="g")(x)

    m = C()
    x = jax.random.normal(K(1), (2, 9, 9, 4))
    p = m.init(K(0), x)["params"]
    st = oneshot.calibrate(m, p, [x])
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))  # SAME, stride 2: 5 x 5 patches
    r = np.array([xp[b, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1)
                  for b in range(2) for i in range(5) for j in range(5)])
    np.testing.assert_allclose(st["c/kernel"].gram, r.T @ r, rtol=1e-4, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dampening warnings on these well-posed layers
        newp, masks = oneshot.prune_layers(p, st, "sparsegpt", 0.5)
    assert newp["c"]["kernel"].dtype == jnp.bfloat16
    for k in ("c", "g"):
        mk, w = np.asarray(masks[k]["kernel"]), np.asarray(newp[k]["kernel"], np.float32)
        assert mk.sum() * 2 == mk.size and np.all(w[~mk] == 0)
