"""A small decoder-only transformer (GQA attention, GELU or SwiGLU FFN) whose per-layer head and FFN
counts can differ, so a structurally pruned model is again an instance of it.

>>> import jax, jax.numpy as jnp
>>> cfg = ToyConfig(vocab=16, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32)
>>> m = ToyGPT(cfg)
>>> v = m.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
>>> m.apply(v, jnp.zeros((2, 8), jnp.int32)).shape
(2, 8, 16)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = ["ToyConfig", "ToyGPT", "config_from_params", "bytes_corpus"]


def _per_layer(v: int | tuple[int, ...], n: int, name: str) -> tuple[int, ...]:
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n:
        raise ValueError(f"ToyConfig.{name}: expected {n} per-layer values, got {len(t)}")
    return t


@dataclass(frozen=True)
class ToyConfig:
    """Hyper-parameters; ``n_heads``, ``n_kv_heads`` and ``d_ff`` may be per-layer tuples."""

    vocab: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int | tuple[int, ...] = 8
    n_kv_heads: int | tuple[int, ...] = 8
    head_dim: int = 16
    d_ff: int | tuple[int, ...] = 512
    glu: bool = False
    max_len: int = 128

    def layer(self, i: int) -> tuple[int, int, int]:
        """``(n_heads, n_kv_heads, d_ff)`` of layer ``i``."""
        n = self.n_layers
        h = _per_layer(self.n_heads, n, "n_heads")[i]
        kv = _per_layer(self.n_kv_heads, n, "n_kv_heads")[i]
        if h % kv:
            raise ValueError(f"ToyConfig: layer {i} has {h} query heads, not a multiple of {kv} "
                             "kv heads")
        return h, kv, _per_layer(self.d_ff, n, "d_ff")[i]


class Attention(nn.Module):
    """Causal grouped-query attention; q is reshaped to ``(kv heads, group, head_dim)``."""

    n_heads: int
    n_kv: int
    head_dim: int
    d_model: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        hd, kv, g = self.head_dim, self.n_kv, self.n_heads // self.n_kv
        q = nn.Dense(self.n_heads * hd, name="q")(x).reshape(b, t, kv, g, hd)
        k = nn.Dense(kv * hd, name="k")(x).reshape(b, t, kv, hd)
        v = nn.Dense(kv * hd, name="v")(x).reshape(b, t, kv, hd)
        att = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(causal, att, -1e9), axis=-1)
        o = jnp.einsum("bkgts,bskd->btkgd", att, v).reshape(b, t, self.n_heads * hd)
        return nn.Dense(self.d_model, name="o")(o)


class FFN(nn.Module):
    """GELU MLP (``up``→``down``) or SwiGLU (``gate``, ``up`` → ``down``)."""

    d_ff: int
    d_model: int
    glu: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.d_ff, name="up")(x)
        h = jax.nn.silu(nn.Dense(self.d_ff, name="gate")(x)) * h if self.glu else jax.nn.gelu(h)
        return nn.Dense(self.d_model, name="down")(h)


class Block(nn.Module):
    """Pre-norm residual block."""

    n_heads: int
    n_kv: int
    head_dim: int
    d_model: int
    d_ff: int
    glu: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.n_heads, self.n_kv, self.head_dim, self.d_model,
                          name="attn")(nn.LayerNorm(name="ln1")(x))
        return x + FFN(self.d_ff, self.d_model, self.glu, name="ffn")(nn.LayerNorm(name="ln2")(x))


class ToyGPT(nn.Module):
    """Token + position embeddings, ``n_layers`` blocks ``Block_i``, final norm, untied head."""

    cfg: ToyConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.cfg
        t = tokens.shape[1]
        x = nn.Embed(c.vocab, c.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (c.max_len, c.d_model))
        x = x + pos[None, :t]
        for i in range(c.n_layers):
            h, kv, ff = c.layer(i)
            x = Block(h, kv, c.head_dim, c.d_model, ff, c.glu, name=f"Block_{i}")(x)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(c.vocab, name="head")(x)


def config_from_params(cfg: ToyConfig, params: Any) -> ToyConfig:
    """The config matching (slim) ``params``: per-layer heads/kv heads/d_ff and layer count.

    >>> cfg = ToyConfig(vocab=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=8)
    >>> p = ToyGPT(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> config_from_params(cfg, p) == replace(cfg, n_heads=(2,), n_kv_heads=(1,), d_ff=(8,))
    True
    """
    blocks = sorted((k for k in params if k.startswith("Block_")), key=lambda k: int(k[6:]))
    hd = cfg.head_dim
    heads, kvs, ffs = [], [], []
    for k in blocks:
        a = params[k]["attn"]
        heads.append(int(np.shape(a["q"]["kernel"])[1]) // hd)
        kvs.append(int(np.shape(a["k"]["kernel"])[1]) // hd)
        ffs.append(int(np.shape(params[k]["ffn"]["up"]["kernel"])[1]))
    return replace(cfg, n_layers=len(blocks), n_heads=tuple(heads), n_kv_heads=tuple(kvs),
                   d_ff=tuple(ffs))


def bytes_corpus(max_bytes: int = 400_000, seed: int = 0) -> np.ndarray:
    """Bytes of Python standard-library source files (offline, deterministic) as uint8.

    >>> bytes_corpus(1000).dtype
    dtype('uint8')
    """
    import os
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    rng = np.random.default_rng(seed)
    rng.shuffle(files)
    out, n = [], 0
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            b = fh.read()
        out.append(np.frombuffer(b, np.uint8))
        n += len(b)
        if n >= max_bytes:
            break
    return np.concatenate(out)[:max_bytes]
