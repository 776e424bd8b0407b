"""A small pre-norm GPT (linen) over bytes, with learned or rotary (RoPE) positions.

Parameter layout: ``embed/{tok,pos}``, ``block_i/{ln1,ln2}``, ``block_i/{q_proj,k_proj,v_proj,o_proj,
fc1,fc2}/{kernel,bias}``, ``head/{ln,lm_head}``. :func:`blocks` splits the model for the sequential
one-shot driver; :func:`loss_fn` / :func:`perplexity` evaluate next-byte prediction.

Layers may differ in their number of attention heads (``layer_heads``, each head ``d // heads`` wide)
and FFN width (``layer_ffn``), so a GPT whose heads / FFN units were removed by structured pruning is
again a :class:`GPT`; :func:`config_from_params` reads that config off (slim) params.

Example:
    >>> cfg = GPTConfig(d=16, layers=2, heads=2, seq=8)
    >>> x = jnp.zeros((1, 8), jnp.int32)
    >>> p = GPT(cfg).init(jax.random.key(0), x)["params"]
    >>> GPT(cfg).apply({"params": p}, x).shape
    (1, 8, 256)

    Per-layer head counts and FFN widths (heads keep their size ``d // heads = 8``):

    >>> small = GPTConfig(d=16, layers=2, heads=2, seq=8, layer_heads=(1, 2), layer_ffn=(24, 40))
    >>> ps = GPT(small).init(jax.random.key(0), x)["params"]
    >>> ps["block_0"]["q_proj"]["kernel"].shape, ps["block_1"]["fc1"]["kernel"].shape
    ((16, 8), (16, 40))
    >>> config_from_params(cfg, ps) == small, GPT(small).apply({"params": ps}, x).shape
    (True, (1, 8, 256))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = ["GPTConfig", "GPT", "GPTEmbed", "GPTBlock", "GPTHead", "blocks", "config_from_params",
           "loss_fn", "perplexity", "batched_perplexity", "rope"]


class _GPTFields(NamedTuple):
    vocab: int = 256
    d: int = 128
    layers: int = 4
    heads: int = 4
    mlp: int = 4
    seq: int = 256
    pos: str = "learned"  # or "rope"
    layer_heads: tuple[int, ...] | None = None
    layer_ffn: tuple[int, ...] | None = None


class GPTConfig(_GPTFields):
    """Hyper-parameters: byte vocabulary, width ``d``, ``layers``, ``heads``, context ``seq``.

    ``heads`` fixes the head size ``head_dim = d // heads`` and the FFN width is ``mlp * d``, unless
    ``layer_heads`` / ``layer_ffn`` (one int per layer; ``None`` = uniform) give per-layer head
    counts / FFN widths, as left by structured pruning. Lists (e.g. from JSON) become tuples, so the
    config stays hashable.

    >>> c = GPTConfig(d=16, layers=2, heads=2, layer_ffn=[8, 64])
    >>> c.layer_ffn, c.head_dim, c.layer(0), c.layer(1)
    ((8, 64), 8, (2, 8), (2, 64))
    """

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> GPTConfig:
        self = super().__new__(cls, *args, **kwargs)
        fixed = {}
        for name in ("layer_heads", "layer_ffn"):
            v = getattr(self, name)
            if v is None:
                continue
            v = tuple(int(n) for n in v)
            if len(v) != self.layers or min(v, default=1) < 1:
                raise ValueError(f"jaxprune.zoo.models.gpt.GPTConfig: {name} must give a positive count "
                                 f"for each of the {self.layers} layers, got {v}")
            fixed[name] = v
        return super().__new__(cls, **{**self._asdict(), **fixed}) if fixed else self

    def _replace(self, **kwargs: Any) -> GPTConfig:
        return type(self)(**{**self._asdict(), **kwargs})

    @property
    def head_dim(self) -> int:
        """Size of one attention head, ``d // heads`` (the same in every layer)."""
        return self.d // self.heads

    def layer(self, i: int) -> tuple[int, int]:
        """``(attention heads, FFN width)`` of layer ``i``."""
        h = self.heads if self.layer_heads is None else self.layer_heads[i]
        f = self.mlp * self.d if self.layer_ffn is None else self.layer_ffn[i]
        return h, f


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
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (causal attention).

    ``index`` selects the layer's head count / FFN width in ``cfg`` (see :meth:`GPTConfig.layer`).
    """

    cfg: GPTConfig
    index: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        b, t, d = x.shape
        hd = c.head_dim
        nh, ff = c.layer(self.index)
        h = nn.LayerNorm(name="ln1")(x)
        q = nn.Dense(nh * hd, name="q_proj")(h).reshape(b, t, nh, hd)
        k = nn.Dense(nh * hd, name="k_proj")(h).reshape(b, t, nh, hd)
        v = nn.Dense(nh * hd, name="v_proj")(h).reshape(b, t, nh, hd)
        if c.pos == "rope":
            q, k = rope(q), rope(k)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.where(causal, s, jnp.finfo(s.dtype).min)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, nh * hd)
        x = x + nn.Dense(d, name="o_proj")(a)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(ff, name="fc1")(h)
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
            x = GPTBlock(self.cfg, i, name=f"block_{i}")(x)
        return GPTHead(self.cfg, name="head")(x)


def blocks(cfg: GPTConfig) -> list[Any]:
    """Embedding plus the transformer blocks as sequential-driver blocks (the head is not pruned).

    >>> [b.path for b in blocks(GPTConfig(layers=2))]
    ['embed', 'block_0', 'block_1']
    """
    from jaxprune.oneshot.sequential import BlockSpec

    return [BlockSpec("embed", GPTEmbed(cfg))] + [
        BlockSpec(f"block_{i}", GPTBlock(cfg, i)) for i in range(cfg.layers)
    ]


def config_from_params(cfg: GPTConfig, params: Any) -> GPTConfig:
    """The config of (slim) ``params``: layer count, per-layer heads and FFN widths read off shapes.

    ``cfg`` supplies everything else (``d``, ``heads`` for the head size, ``pos``, ...); per-layer
    fields stay ``None`` where every layer has the uniform value. ``params`` may be the ``params``
    collection or the ``{"params": ...}`` variables; blocks ``block_<i>`` are read in index order
    (as :func:`jaxprune.structured.drop_blocks` leaves them).

    >>> cfg = GPTConfig(d=16, layers=3, heads=2, seq=8)
    >>> p = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> config_from_params(cfg, p) == cfg
    True
    >>> del p["block_2"]
    >>> config_from_params(cfg, p).layers
    2
    """
    if "params" in params and not any(re.fullmatch(r"block_\d+", k) for k in params):
        params = params["params"]
    names = sorted((k for k in params if re.fullmatch(r"block_\d+", k)), key=lambda k: int(k[6:]))
    hd = cfg.head_dim
    heads = tuple(int(np.shape(params[k]["q_proj"]["kernel"])[-1]) // hd for k in names)
    ffn = tuple(int(np.shape(params[k]["fc1"]["kernel"])[-1]) for k in names)
    return cfg._replace(layers=len(names),
                        layer_heads=None if set(heads) <= {cfg.heads} else heads,
                        layer_ffn=None if set(ffn) <= {cfg.mlp * cfg.d} else ffn)


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


# the model is a static argument (linen modules hash by their config): one compile per model
# config and batch shape, reused across calls
_loss_jit = jax.jit(lambda model, p, r: loss_fn(model, p, r), static_argnums=0)


def perplexity(model: GPT, params: Any, records: Iterable[np.ndarray] | np.ndarray,
               batch: int = 64) -> float:
    """Byte-level perplexity ``exp(mean NLL)`` over all records (equal-size batches weighted).

    >>> cfg = GPTConfig(d=16, layers=1, heads=2, seq=8)
    >>> p = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> perplexity(GPT(cfg), p, np.zeros((3, 9), np.uint8)) > 1.0
    True
    """
    return batched_perplexity(lambda r: _loss_jit(model, params, r), records, batch)


def batched_perplexity(mean_nll: Callable[[np.ndarray], Any],
                       records: Iterable[np.ndarray] | np.ndarray, batch: int = 64) -> float:
    """``exp`` of the record-weighted mean of ``mean_nll(chunk)`` (a chunk's mean next-byte NLL)
    over consecutive chunks of ``batch`` records; ``1.0`` for no records.

    >>> recs = np.arange(5)[:, None]          # 5 records, NLL of a record = its value, mean 2
    >>> round(batched_perplexity(lambda r: r.mean(), recs, batch=2), 4)   # exp(2), not exp(7/3)
    7.3891
    """
    recs = np.asarray(records)
    tot, n = 0.0, 0
    for s in range(0, len(recs), batch):
        r = recs[s:s + batch]
        tot += float(mean_nll(r)) * len(r)
        n += len(r)
    return float(np.exp(tot / max(n, 1)))
