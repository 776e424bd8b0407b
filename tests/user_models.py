"""Models written the way other people write them — not jaxprune's reference models.

* :class:`GQADecoder` — linen decoder block stack: ``nn.DenseGeneral`` q/k/v ``(d, heads, head_dim)``
  and o ``(heads, head_dim, d)``, grouped-query attention, RoPE, RMSNorm, SwiGLU MLP.
* :class:`EinsumMLP` — raw ``self.param`` weights used through ``jnp.einsum`` (Gemma style).
* :class:`NnxGeneral` — nnx with ``nnx.LinearGeneral`` and ``nnx.Einsum``, plus Dropout.
* :func:`torch_layout_params` / :func:`torch_layout_apply` — a tree converted from PyTorch:
  ``weight`` ``(out, in)`` used as ``x @ W.T``.

Each ``make_*`` returns ``(fn, params, x)`` with ``fn(params, x)`` the forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


def rope(x: jax.Array) -> jax.Array:
    """Rotary embedding over the last axis (NEOX half split); ``x`` is ``(b, t, h, d)``."""
    t, d = x.shape[1], x.shape[-1]
    inv = 1.0 / (10000 ** (jnp.arange(0, d // 2) / (d // 2)))
    ang = jnp.arange(t)[:, None] * inv[None, :]
    sin, cos = jnp.sin(ang)[None, :, None, :], jnp.cos(ang)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


class GQABlock(nn.Module):
    d: int = 32
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    ffn: int = 64

    @nn.compact
    def __call__(self, x):
        h = RMSNorm(name="attn_norm")(x)
        q = nn.DenseGeneral((self.heads, self.head_dim), use_bias=False, name="q")(h)
        k = nn.DenseGeneral((self.kv_heads, self.head_dim), use_bias=False, name="k")(h)
        v = nn.DenseGeneral((self.kv_heads, self.head_dim), use_bias=False, name="v")(h)
        q, k = rope(q), rope(k)
        rep = self.heads // self.kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(self.head_dim)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        a = jax.nn.softmax(jnp.where(causal, s, -1e9), -1)
        o = jnp.einsum("bhts,bshd->bthd", a, v)
        x = x + nn.DenseGeneral(self.d, axis=(-2, -1), use_bias=False, name="o")(o)
        h = RMSNorm(name="mlp_norm")(x)
        gate = nn.Dense(self.ffn, use_bias=False, name="gate")(h)
        up = nn.Dense(self.ffn, use_bias=False, name="up")(h)
        return x + nn.Dense(self.d, use_bias=False, name="down")(jax.nn.silu(gate) * up)


class GQADecoder(nn.Module):
    vocab: int = 64
    d: int = 32
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        emb = nn.Embed(self.vocab, self.d, name="embed")
        x = emb(tokens)
        for i in range(self.layers):
            x = GQABlock(d=self.d, name=f"block_{i}")(x)
        return emb.attend(RMSNorm(name="final_norm")(x))


def make_gqa(seed: int = 0):
    model = GQADecoder()
    tokens = jax.random.randint(jax.random.key(seed + 1), (2, 8), 0, 64)
    params = model.init(jax.random.key(seed), tokens)["params"]
    return (lambda p, t: model.apply({"params": p}, t)), params, tokens


class EinsumMLP(nn.Module):
    d: int = 32
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.2)
        w_in = self.param("w_in", init, (2, self.d, self.hidden))  # gate and up stacked
        w_out = self.param("w_out", init, (self.hidden, self.d))
        g, u = jnp.einsum("btd,cdf->cbtf", x, w_in)
        return jnp.einsum("btf,fd->btd", jax.nn.gelu(g) * u, w_out)


def make_einsum_mlp(seed: int = 0):
    model = EinsumMLP()
    x = jax.random.normal(jax.random.key(seed + 1), (2, 8, 32))
    params = model.init(jax.random.key(seed), x)["params"]
    return (lambda p, x: model.apply({"params": p}, x)), params, x


class NnxGeneral(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.LinearGeneral(32, (4, 8), rngs=rngs)
        self.mix = nnx.Einsum("bhk,hkd->bd", (4, 8, 32), (32,), rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.mix(self.inp(x)))))


def make_nnx(seed: int = 0):
    model = NnxGeneral(nnx.Rngs(seed))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(seed + 1), (4, 32))
    return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params, x


def torch_layout_params(seed: int = 0) -> dict:
    ks = jax.random.split(jax.random.key(seed), 3)
    return {
        "fc1": {"weight": jax.random.normal(ks[0], (64, 32)) * 0.2, "bias": jnp.zeros(64)},
        "fc2": {"weight": jax.random.normal(ks[1], (16, 64)) * 0.2, "bias": jnp.zeros(16)},
        "ln": {"weight": jnp.ones(32), "bias": jnp.zeros(32)},
    }


def torch_layout_apply(p: dict, x: jax.Array) -> jax.Array:
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mu) / jnp.sqrt(var + 1e-5) * p["ln"]["weight"] + p["ln"]["bias"]
    h = jax.nn.relu(x @ p["fc1"]["weight"].T + p["fc1"]["bias"])
    return h @ p["fc2"]["weight"].T + p["fc2"]["bias"]


def make_torch(seed: int = 0):
    x = jax.random.normal(jax.random.key(seed + 1), (4, 32))
    return torch_layout_apply, torch_layout_params(seed), x


def nnx_mlp_task(din: int, sizes: tuple[int, ...], n: int):
    """A small ``NnxMLP`` classifier task: ``(graphdef, params, x, y)`` (labels in ``sizes[-1]``)."""
    from jaxprune.zoo.models import NnxMLP

    graphdef, params = nnx.split(NnxMLP(din, sizes, rngs=nnx.Rngs(0)), nnx.Param)
    x = jax.random.normal(jax.random.key(1), (n, din))
    y = jax.random.randint(jax.random.key(2), (n,), 0, sizes[-1])
    return graphdef, params, x, y


MAKERS = {"gqa": make_gqa, "einsum_mlp": make_einsum_mlp, "nnx": make_nnx, "torch": make_torch}
# the matmul/conv weights each model has (what the default filter must select)
WEIGHTS = {
    "gqa": {f"block_{i}/{n}/kernel" for i in range(2) for n in ("q", "k", "v", "o", "gate", "up", "down")},
    "einsum_mlp": {"w_in", "w_out"},
    "nnx": {"inp/kernel", "mix/kernel", "out/kernel"},
    "torch": {"fc1/weight", "fc2/weight"},
}
