"""Dependency-group discovery by jaxpr tracing, against hand-written expected groups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxprune.structured import TraceError, declare_groups, discover_groups
from jaxprune.zoo.models import CNN, MLP, NnxMLP
from jaxprune.zoo.models.toy_transformer import ToyConfig, ToyGPT


class ScaledMLP(nn.Module):
    """Dense -> per-unit scale ("norm scale") -> relu -> Dense; defined only here."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="fc1")(x)
        h = h * self.param("scale", nn.initializers.ones, (8,))
        return nn.Dense(3, name="fc2")(jax.nn.relu(h))


class ConvBN(nn.Module):
    """conv -> BN -> relu -> conv -> flatten -> dense (defined only here)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(6, (3, 3), name="c1")(x)))
        x = nn.relu(nn.Conv(5, (3, 3), name="c2")(x))
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


class RepeatGQA(nn.Module):
    """GQA block written differently from the toy model: kv heads repeated with jnp.repeat,
    SwiGLU FFN, no norm. Defined only in this test (an unseen model for the tracer)."""

    dims: tuple[int, ...] = (16, 4, 2, 4, 12)  # width, q heads, kv heads, head size, FFN

    @nn.compact
    def __call__(self, x):
        (b, t, _), (d, hq, hkv, hd, ff) = x.shape, self.dims
        proj = {n: nn.Dense(f * hd, use_bias=False, name=n) for n, f in
                (("wq", hq), ("wk", hkv), ("wv", hkv))}
        q, k, v = (proj[n](x).reshape(b, t, -1, hd) for n in ("wq", "wk", "wv"))
        k, v = jnp.repeat(k, hq // hkv, axis=2), jnp.repeat(v, hq // hkv, axis=2)
        a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / 2.0, axis=-1)
        o = jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, hq * hd)
        x = x + nn.Dense(d, use_bias=False, name="wo")(o)
        g, u = (nn.Dense(ff, use_bias=False, name=n)(x) for n in ("w_gate", "w_up"))
        return x + nn.Dense(d, use_bias=False, name="w_down")(jax.nn.silu(g) * u)


def keys(groups):
    return {g.key() for g in groups}


def simple(groups):
    return {g.simple_key() for g in groups}


def test_mlp_groups_linen():
    x = jnp.ones((2, 64))
    v = MLP().init(jax.random.key(0), x)
    gs = discover_groups(MLP().apply, v, x)
    assert simple(gs) == {
        frozenset({("params/Dense_0/kernel", 1), ("params/Dense_0/bias", 0), ("params/Dense_1/kernel", 0)}),
        frozenset({("params/Dense_1/kernel", 1), ("params/Dense_1/bias", 0), ("params/Dense_2/kernel", 0)}),
    }
    assert all(g.size == 256 and g.exact for g in gs)


def test_scaled_mlp_norm_scale_joins_group():
    x = jnp.ones((2, 5))
    v = ScaledMLP().init(jax.random.key(0), x)
    (g,) = discover_groups(ScaledMLP().apply, v, x)
    assert g.simple_key() == {("params/fc1/kernel", 1), ("params/fc1/bias", 0), ("params/scale", 0),
                              ("params/fc2/kernel", 0)}


def test_nnx_mlp_groups():
    m = NnxMLP(6, (7, 3), rngs=nnx.Rngs(0))
    gd, st = nnx.split(m)
    (g,) = discover_groups(lambda s, x: nnx.merge(gd, s)(x), st, jnp.ones((1, 6)))
    assert g.simple_key() == {("layers/0/kernel", 1), ("layers/0/bias", 0), ("layers/1/kernel", 0)}


def test_conv_bn_flatten_groups():
    x = jnp.ones((2, 6, 6, 2))
    v = ConvBN().init(jax.random.key(0), x)
    gs = discover_groups(ConvBN().apply, v, x)
    assert keys(gs) == {
        frozenset({("params/c1/kernel", 3, (6,), 0), ("params/c1/bias", 0, (6,), 0),
                   ("params/bn/scale", 0, (6,), 0), ("params/bn/bias", 0, (6,), 0),
                   ("batch_stats/bn/mean", 0, (6,), 0), ("batch_stats/bn/var", 0, (6,), 0),
                   ("params/c2/kernel", 2, (6,), 0)}),
        # the conv channel is the innermost factor of the flattened (h, w, c) dense input
        frozenset({("params/c2/kernel", 3, (5,), 0), ("params/c2/bias", 0, (5,), 0),
                   ("params/fc/kernel", 0, (6, 6, 5), 2)}),
    }


def test_cnn_from_models():
    x = jnp.ones((1, 8, 8, 1))
    v = CNN().init(jax.random.key(0), x)
    gs = discover_groups(CNN().apply, v, x)
    assert [g.size for g in gs] == [32, 64, 128]


def test_toy_gqa_glu_groups():
    cfg = ToyConfig(vocab=11, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=12,
                    glu=True, max_len=8)
    m = ToyGPT(cfg)
    x = jnp.zeros((1, 8), jnp.int32)
    v = m.init(jax.random.key(0), x)
    gs = discover_groups(m.apply, v, x)
    a = "params/Block_0/attn/"
    qs, kvs = (2, 2, 4), (2, 4)
    kv_heads = frozenset({(a + "q/kernel", 1, qs, 0), (a + "q/bias", 0, qs, 0), (a + "k/kernel", 1, kvs, 0),
                          (a + "k/bias", 0, kvs, 0), (a + "v/kernel", 1, kvs, 0), (a + "v/bias", 0, kvs, 0),
                          (a + "o/kernel", 0, qs, 0)})
    q_in_group = frozenset({(a + "q/kernel", 1, qs, 1), (a + "q/bias", 0, qs, 1), (a + "o/kernel", 0, qs, 1)})
    f = "params/Block_0/ffn/"
    glu = frozenset({(f + "gate/kernel", 1, (12,), 0), (f + "gate/bias", 0, (12,), 0),
                     (f + "up/kernel", 1, (12,), 0), (f + "up/bias", 0, (12,), 0),
                     (f + "down/kernel", 0, (12,), 0)})
    ks = keys(gs)
    assert kv_heads in ks and q_in_group in ks and glu in ks
    # the residual stream spans every block, the embeddings and the head; it is inexact (LayerNorm)
    resid = [g for g in gs if ("params/embed/embedding", 1) in g.simple_key()]
    assert len(resid) == 1 and not resid[0].exact
    assert ("params/head/kernel", 0) in resid[0].simple_key()
    assert ("params/Block_0/ffn/down/kernel", 1) in resid[0].simple_key()


def test_unseen_repeat_gqa_block():
    m = RepeatGQA()
    x = jnp.ones((1, 5, 16))
    v = m.init(jax.random.key(0), x)
    gs = discover_groups(m.apply, v, x)
    qs = (2, 2, 4)
    kv = frozenset({("params/wq/kernel", 1, qs, 0), ("params/wk/kernel", 1, (2, 4), 0),
                    ("params/wv/kernel", 1, (2, 4), 0), ("params/wo/kernel", 0, qs, 0)})
    qg = frozenset({("params/wq/kernel", 1, qs, 1), ("params/wo/kernel", 0, qs, 1)})
    glu = frozenset({("params/w_gate/kernel", 1, (12,), 0), ("params/w_up/kernel", 1, (12,), 0),
                     ("params/w_down/kernel", 0, (12,), 0)})
    ks = keys(gs)
    assert kv in ks and qg in ks and glu in ks


def test_linen_mha_heads():
    m = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, name=None)
    x = jnp.ones((1, 3, 8))
    v = m.init(jax.random.key(0), x)
    gs = discover_groups(m.apply, v, x)
    heads = [g for g in gs if ("params/out/kernel", 0) in g.simple_key()]
    assert len(heads) == 1 and heads[0].size == 4
    assert ("params/query/kernel", 1) in heads[0].simple_key()
    assert ("params/key/kernel", 1) in heads[0].simple_key()


def test_unknown_op_raises_clear_error():
    def fn(p, x):
        h = jnp.fft.fft(x @ p["w_in"]).real  # no rule for 'fft'
        return h @ p["w_out"]

    p = {"w_in": jnp.ones((3, 4)), "w_out": jnp.ones((4, 2))}
    with pytest.raises(TraceError, match=r"primitive 'fft'.*w_in.*declare_groups"):
        discover_groups(fn, p, jnp.ones((1, 3)))
    # opaque_ops turns the op into a barrier: nothing flowing through it is prunable
    assert discover_groups(fn, p, jnp.ones((1, 3)), opaque_ops={"fft"}) == []


def test_scan_carry_joins_the_recurrent_axis():
    def fn(p, x):
        def body(c, w):
            return jnp.tanh(c @ p["w"] + w), c @ p["w_y"]

        h, ys = jax.lax.scan(body, x @ p["w_in"], jnp.zeros((2, 1, 4)))
        return h @ p["w_out"] + ys.sum(0) @ p["w_z"]

    p = {"w_in": jnp.ones((3, 4)), "w": jnp.ones((4, 4)), "w_out": jnp.ones((4, 2)),
         "w_y": jnp.ones((4, 5)), "w_z": jnp.ones((5, 2))}
    gs = discover_groups(fn, p, jnp.ones((1, 3)))
    # the carry's axis is one unit axis across iterations: in and out of the recurrent kernel
    assert simple(gs) == {
        frozenset({("w_in", 1), ("w", 0), ("w", 1), ("w_out", 0), ("w_y", 0)}),
        frozenset({("w_y", 1), ("w_z", 0)}),
    }


def test_scan_over_stacked_layers_and_cond_while():
    def fn(p, x):
        def body(h, w):
            return jax.nn.relu(h @ w), None

        h, _ = jax.lax.scan(body, x @ p["w_in"], p["stack"])  # stacked (layers, 4, 4) kernels
        h = jax.lax.cond(x.sum() > 0, lambda h: h * 2.0, lambda h: -h, h)
        h = jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ p["w_loop"]), (0, h))[1]
        return h @ p["w_out"]

    p = {"w_in": jnp.ones((3, 4)), "stack": jnp.ones((2, 4, 4)), "w_loop": jnp.ones((4, 4)),
         "w_out": jnp.ones((4, 2))}
    (g,) = discover_groups(fn, p, jnp.ones((1, 3)))
    assert g.simple_key() == {("w_in", 1), ("stack", 1), ("stack", 2), ("w_loop", 0), ("w_loop", 1),
                              ("w_out", 0)}
    # the layer axis of the stacked kernels is fixed (it is what the scan iterates over)
    fixed = discover_groups(fn, p, jnp.ones((1, 3)), include_fixed=True)
    assert any(("stack", 0) in f.simple_key() and f.kind == "fixed" for f in fixed)


def test_output_and_data_axes_are_fixed():
    p = {"w": jnp.ones((3, 4)), "c": jnp.ones((4,))}
    # adding an input-derived (data) array to the hidden axis pins it
    gs = discover_groups(lambda p, x: (x @ p["w"] + x[:, :1] * jnp.arange(4.0)) @ jnp.ones((4, 2)),
                         p, jnp.ones((2, 3)))
    assert gs == []


def test_declare_groups_checks_shapes():
    p = {"a": np.ones((4, 8)), "b": np.ones((8, 2))}
    (g,) = declare_groups([[("a", 1), ("b", 0)]], p, names=["hidden"])
    assert g.name == "hidden" and g.size == 8
    with pytest.raises(ValueError, match="no parameter at path 'zz'"):
        declare_groups([[("zz", 0)]], p)
    with pytest.raises(ValueError, match="mixes unit counts"):
        declare_groups([[("a", 0), ("b", 0)]], p)
