"""A small pre-norm GPT (linen) over bytes, with learned or rotary (RoPE) positions.

Parameter layout: ``embed/{tok,pos}``, ``block_i/{ln1,ln2}``, ``block_i/{q_proj,k_proj,v_proj,o_proj,
fc1,fc2}/{kernel,bias}``, ``head/{ln,lm_head}``. :func:`blocks` splits the model for the sequential
one-shot driver; :func:`loss_fn` / :func:`perplexity` evaluate next-byte prediction.

Example:
    >>> cfg = GPTConfig(d=16, layers=2, heads=2, seq=8)
    >>> x = jnp.zeros((1, 8), jnp.int32)
    >>> p = GPT(cfg).init(jax.random.key(0), x)["params"]
    >>> GPT(cfg).apply({"params": p}, x).shape
    (1, 8, 256)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = ["GPTConfig", "GPT", "GPTEmbed", "GPTBlock", "GPTHead", "blocks", "loss_fn", "perplexity",
           "rope"]


class GPTConfig(NamedTuple):
    """Hyper-parameters: byte vocabulary, width ``d``, ``layers``, ``heads``, context ``seq``."""

    vocab: int = 256
    d: int = 128
    layers: int = 4
    heads: int = 4
    mlp: int = 4
    seq: int = 256
    pos: str = "learned"  # or "rope"


def rope(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding on ``(b, t, h, hd)`` (pairs of halves rotated).

    >>> y = rope(jnp.ones((1, 3, 1, 4)))
    >>> bool(jnp.allclose(y[0, 0], 1.0))
    True
    """
    t, hd = x.shape[1], x.shape[-1]
    half = hd // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class GPTEmbed(nn.Module):
    """Token (+ learned position) embedding."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.cfg
        x = nn.Embed(c.vocab, c.d, name="tok")(tokens)
        if c.pos == "learned":
            x = x + nn.Embed(c.seq, c.d, name="pos")(jnp.arange(tokens.shape[-1])[None])
        return x


class GPTBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (causal attention)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        b, t, d = x.shape
        hd = d // c.heads
        h = nn.LayerNorm(name="ln1")(x)
        q = nn.Dense(d, name="q_proj")(h).reshape(b, t, c.heads, hd)
        k = nn.Dense(d, name="k_proj")(h).reshape(b, t, c.heads, hd)
        v = nn.Dense(d, name="v_proj")(h).reshape(b, t, c.heads, hd)
        if c.pos == "rope":
            q, k = rope(q), rope(k)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
        x = x + nn.Dense(d, name="o_proj")(a)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(c.mlp * d, name="fc1")(h)
        return x + nn.Dense(d, name="fc2")(jax.nn.gelu(h))


class GPTHead(nn.Module):
    """Final LayerNorm and the byte logits."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.cfg.vocab, name="lm_head")(nn.LayerNorm(name="ln")(x))


class GPT(nn.Module):
    """``tokens (b, t) int -> logits (b, t, vocab)``."""

    cfg: GPTConfig = GPTConfig()

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = GPTEmbed(self.cfg, name="embed")(tokens)
        for i in range(self.cfg.layers):
            x = GPTBlock(self.cfg, name=f"block_{i}")(x)
        return GPTHead(self.cfg, name="head")(x)


def blocks(cfg: GPTConfig) -> list[Any]:
    """Embedding plus the transformer blocks as sequential-driver blocks (the head is not pruned).

    >>> [b.path for b in blocks(GPTConfig(layers=2))]
    ['embed', 'block_0', 'block_1']
    """
    from jaxprune.oneshot.sequential import BlockSpec

    return [BlockSpec("embed", GPTEmbed(cfg))] + [
        BlockSpec(f"block_{i}", GPTBlock(cfg)) for i in range(cfg.layers)
    ]


def loss_fn(model: GPT, params: Any, records: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy (nats) of ``records (b, t+1)``.

    >>> cfg = GPTConfig(d=16, layers=1, heads=2, seq=8)
    >>> p = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> float(loss_fn(GPT(cfg), p, jnp.zeros((2, 9), jnp.int32))) > 0
    True
    """
    records = jnp.asarray(records, jnp.int32)
    logits = model.apply({"params": params}, records[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(logp, records[:, 1:, None], -1))


def perplexity(model: GPT, params: Any, records: Iterable[np.ndarray] | np.ndarray,
               batch: int = 64) -> float:
    """Byte-level perplexity ``exp(mean NLL)`` over all records (equal-size batches weighted).

    >>> cfg = GPTConfig(d=16, layers=1, heads=2, seq=8)
    >>> p = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> perplexity(GPT(cfg), p, np.zeros((3, 9), np.uint8)) > 1.0
    True
    """
    recs = np.asarray(records)
    f = jax.jit(lambda p, r: loss_fn(model, p, r))
    tot, n = 0.0, 0
    for s in range(0, len(recs), batch):
        r = recs[s:s + batch]
        tot += float(f(params, r)) * len(r)
        n += len(r)
    return float(np.exp(tot / max(n, 1)))
