"""A tiny GPT-style byte-level language model (linen), for sparse pretraining on CPU.

Pre-LayerNorm decoder blocks (causal multi-head attention + GELU MLP), learned positions, untied
output head. All matmuls are ``nn.Dense`` layers named ``kernel``, so the default pruning filter
(:func:`jaxprune.core.filters.select`) prunes attention and MLP weights and the head, not embeddings.

Example:
    >>> import jax, jax.numpy as jnp
    >>> m = TinyLM(d_model=32, n_layers=1, n_heads=2, max_len=16)
    >>> p = m.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    >>> m.apply({"params": p}, jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 256)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = ["TinyLM", "Block", "lm_loss"]


class Block(nn.Module):
    """Pre-LN decoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    d_model: int
    n_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.n_heads
        h = nn.LayerNorm(name="ln1")(x)
        qkv = nn.Dense(3 * d, name="qkv")(h).reshape(b, t, 3, self.n_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(x.dtype)
        causal = jnp.tril(jnp.ones((t, t), bool))
        att = jax.nn.softmax(jnp.where(causal, att, jnp.finfo(att.dtype).min), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
        x = x + nn.Dense(d, name="proj")(y)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(4 * d, name="fc")(h)
        return x + nn.Dense(d, name="fc_out")(jax.nn.gelu(h))


class TinyLM(nn.Module):
    """Byte-level GPT: ``(batch, seq) int32 -> (batch, seq, vocab)`` logits.

    >>> TinyLM().d_model
    128
    """

    vocab: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_len: int = 128

    def setup(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"jaxprune: TinyLM d_model={self.d_model} not divisible by n_heads={self.n_heads}"
            )

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"jaxprune: sequence length {t} exceeds TinyLM.max_len={self.max_len}")
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = x + pos[:t]
        for i in range(self.n_layers):
            x = Block(self.d_model, self.n_heads, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(self.vocab, name="head")(x)


def lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats): predict ``tokens[:, 1:]`` from ``logits[:, :-1]``.

    >>> float(lm_loss(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32))) == float(jnp.log(4.))
    True
    """
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
