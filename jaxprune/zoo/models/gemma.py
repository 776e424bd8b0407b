"""Gemma 3 decoder in Flax linen, with Gemma's own parameter layout (einsum params).

The projections are raw ``self.param`` arrays multiplied with ``jnp.einsum``, the way
google-deepmind/gemma writes them, so this model exercises the operator map on einsum params:

========================  ===================  ===============================
param                     shape                used as
========================  ===================  ===============================
``attn/q_einsum``         ``(N, D, H)``        ``BTD,NDH->BTNH``
``attn/kv_einsum``        ``(2, K, D, H)``     ``BSD,CKDH->CBSKH`` (k and v stacked)
``attn/attn_vec_einsum``  ``(N, H, D)``        ``BTNH,NHD->BTD``
``mlp/gating_einsum``     ``(2, F, D)``        ``BTD,CFD->CBTF`` (gate and up stacked)
``mlp/linear``            ``(F, D)``           ``BTF,FD->BTD``
``embedder/input_embedding`` ``(V, D)``        lookup × sqrt(D); tied output ``BTD,VD->BTV``
========================  ===================  ===============================

Blocks: RMSNorm before and after attention and the GeGLU MLP (pre/post norms), RMSNorm on queries
and keys (over ``head_dim``), grouped-query attention, NEOX-style (half-split) RoPE with a local base
on sliding-window layers and a global base on global layers. Norm scales are stored as *multipliers*
(``x · scale``, the GGUF convention that already includes Gemma's ``+1``).

Example:
    >>> cfg = GemmaConfig(vocab=32, d=16, layers=2, heads=2, kv_heads=1, head_dim=8, ffn=24,
    ...                   sliding_window=4, sliding_pattern=2)
    >>> toks = jnp.zeros((1, 6), jnp.int32)
    >>> params = jax.jit(Gemma(cfg).init)(jax.random.key(0), toks)["params"]
    >>> logits = jax.jit(Gemma(cfg).apply)({"params": params}, toks)
    >>> params["layer_0"]["attn"]["kv_einsum"].shape, logits.shape
    ((2, 1, 16, 8), (1, 6, 32))
    >>> cfg.is_global(0), cfg.is_global(1)
    (False, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = ["GemmaConfig", "Gemma", "GemmaBlock", "config_from_metadata", "config_from_params",
           "with_out_bias", "rope", "perplexity", "nll_sum", "greedy"]


@dataclass(frozen=True)
class GemmaConfig:
    """Gemma 3 hyper-parameters (hashable; read them from a GGUF with :func:`config_from_metadata`).

    A layer ``i`` is global when ``(i + 1) % sliding_pattern == 0``, otherwise it attends to the last
    ``sliding_window`` positions only. ``query_scale`` defaults to ``head_dim ** -0.5``.
    ``layer_heads`` / ``layer_kv_heads`` / ``layer_ffn`` give per-layer query-head and KV-head counts
    and FFN widths (a structurally
    pruned model, see :func:`config_from_params`); ``out_bias`` adds a ``bias`` (d,) after the
    attention output and the MLP down projection (Gemma has none; FLAP bias compensation folds the
    removed units' mean contribution into it).

    >>> GemmaConfig(layers=18).global_layers()
    (5, 11, 17)
    >>> hash(GemmaConfig(layers=2, layer_heads=[4, 2])) == hash(GemmaConfig(layers=2, layer_heads=(4, 2)))
    True
    """

    vocab: int = 262144
    d: int = 640
    layers: int = 18
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 256
    ffn: int = 2048
    eps: float = 1e-6
    rope_global: float = 1_000_000.0
    rope_local: float = 10_000.0
    sliding_window: int = 512
    sliding_pattern: int = 6
    query_scale: float | None = None
    final_softcap: float | None = None
    layer_heads: tuple[int, ...] | None = None
    layer_ffn: tuple[int, ...] | None = None
    layer_kv_heads: tuple[int, ...] | None = None
    out_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("layer_heads", "layer_ffn", "layer_kv_heads"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):  # lists (e.g. from JSON): hashable
                v = tuple(int(n) for n in v)
                object.__setattr__(self, name, v)
            if v is not None and (len(v) != self.layers or any(int(n) < 1 for n in v)):
                raise ValueError(f"jaxprune.zoo gemma: {name} must give one count >= 1 for each of "
                                 f"the {self.layers} layers, got {v!r}")
        for i in range(self.layers):
            if self.heads_at(i) % self.kv_heads_at(i):
                raise ValueError(f"jaxprune.zoo gemma: layer {i} has {self.heads_at(i)} query heads, "
                                 f"not a multiple of kv_heads={self.kv_heads_at(i)}")

    def heads_at(self, i: int) -> int:
        """Query heads of layer ``i`` (``layer_heads[i]`` of a slimmed model, else ``heads``)."""
        return self.heads if self.layer_heads is None else int(self.layer_heads[i])

    def kv_heads_at(self, i: int) -> int:
        """KV heads of layer ``i`` (``layer_kv_heads[i]`` of a slimmed model, else ``kv_heads``)."""
        return self.kv_heads if self.layer_kv_heads is None else int(self.layer_kv_heads[i])

    def ffn_at(self, i: int) -> int:
        """FFN width of layer ``i`` (``layer_ffn[i]`` of a slimmed model, else ``ffn``)."""
        return self.ffn if self.layer_ffn is None else int(self.layer_ffn[i])

    def is_global(self, i: int) -> bool:
        """Whether layer ``i`` attends globally (else: sliding window)."""
        return (i + 1) % self.sliding_pattern == 0

    def global_layers(self) -> tuple[int, ...]:
        """Indices of the global-attention layers."""
        return tuple(i for i in range(self.layers) if self.is_global(i))

    @property
    def scale(self) -> float:
        """The factor queries are multiplied by."""
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5


# llama.cpp's defaults for gemma3 where the GGUF metadata is silent (llama-model.cpp, LLM_ARCH_GEMMA3)
_DEFAULTS = {"rope_local": 10_000.0, "sliding_pattern": 6, "sliding_window": 512}


def config_from_metadata(meta: Mapping[str, Any]) -> GemmaConfig:
    """Build a :class:`GemmaConfig` from GGUF key/values (``general.architecture`` = ``gemma3``).

    Required keys missing from ``meta`` raise ``KeyError`` naming them; the local RoPE base, the
    sliding-window pattern and (if absent) the window take llama.cpp's gemma3 defaults.

    >>> m = {"general.architecture": "gemma3", "gemma3.embedding_length": 16,
    ...      "gemma3.block_count": 2, "gemma3.feed_forward_length": 24,
    ...      "gemma3.attention.head_count": 2, "gemma3.attention.head_count_kv": 1,
    ...      "gemma3.attention.key_length": 8, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
    ...      "gemma3.rope.freq_base": 1e6, "tokenizer.ggml.tokens": ["a"] * 32}
    >>> c = config_from_metadata(m); (c.d, c.layers, c.vocab, c.sliding_window)
    (16, 2, 32, 512)
    """
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"jaxprune.zoo gemma: GGUF architecture is {arch!r}, expected 'gemma3'")
    need = {"d": "embedding_length", "layers": "block_count", "ffn": "feed_forward_length",
            "heads": "attention.head_count", "kv_heads": "attention.head_count_kv",
            "head_dim": "attention.key_length", "eps": "attention.layer_norm_rms_epsilon",
            "rope_global": "rope.freq_base"}
    missing = [f"gemma3.{k}" for k in need.values() if f"gemma3.{k}" not in meta]
    if "tokenizer.ggml.tokens" not in meta:
        missing.append("tokenizer.ggml.tokens")
    if missing:
        raise KeyError(f"jaxprune.zoo gemma: GGUF metadata lacks {missing}")
    vlen = meta.get("gemma3.attention.value_length", meta["gemma3.attention.key_length"])
    if vlen != meta["gemma3.attention.key_length"]:
        raise ValueError(f"jaxprune.zoo gemma: key_length != value_length ({vlen}) is not supported")
    kw: dict[str, Any] = {f: meta[f"gemma3.{k}"] for f, k in need.items()}
    kw = {f: (float(v) if f in ("eps", "rope_global") else int(v)) for f, v in kw.items()}
    kw["vocab"] = len(meta["tokenizer.ggml.tokens"])
    kw["sliding_window"] = int(meta.get("gemma3.attention.sliding_window", _DEFAULTS["sliding_window"]))
    kw["rope_local"] = _DEFAULTS["rope_local"]
    kw["sliding_pattern"] = _DEFAULTS["sliding_pattern"]
    if "gemma3.final_logit_softcapping" in meta:
        kw["final_softcap"] = float(meta["gemma3.final_logit_softcapping"])
    return GemmaConfig(**kw)


def config_from_params(cfg: GemmaConfig, params: Mapping[str, Any]) -> GemmaConfig:
    """``cfg`` with the per-layer query-head / KV-head counts and FFN widths (and ``out_bias``)
    that ``params`` carries: the config of a structurally pruned (slimmed) Gemma. Layers absent
    from ``params`` (blocks removed) keep ``cfg``'s sizes.

    >>> cfg = GemmaConfig(vocab=8, d=8, layers=2, heads=2, kv_heads=1, head_dim=4, ffn=8)
    >>> kv = np.zeros((2, 1, 8, 4))
    >>> p = {"layer_0": {"attn": {"q_einsum": np.zeros((1, 8, 4)), "kv_einsum": kv},
    ...                  "mlp": {"linear": np.zeros((5, 8))}},
    ...      "layer_1": {"attn": {"q_einsum": np.zeros((2, 8, 4)), "kv_einsum": kv},
    ...                  "mlp": {"linear": np.zeros((8, 8))}}}
    >>> c = config_from_params(cfg, p); c.layer_heads, c.layer_ffn, c.out_bias
    ((1, 2), (5, 8), False)
    """
    heads, kv, ffn, bias = [], [], [], False
    for i in range(cfg.layers):
        blk = params.get(f"layer_{i}")
        if blk is None:
            heads.append(cfg.heads_at(i))
            kv.append(cfg.kv_heads_at(i))
            ffn.append(cfg.ffn_at(i))
            continue
        try:
            heads.append(int(np.shape(blk["attn"]["q_einsum"])[0]))
            kv.append(int(np.shape(blk["attn"]["kv_einsum"])[1]))
            ffn.append(int(np.shape(blk["mlp"]["linear"])[0]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"jaxprune.zoo gemma: params 'layer_{i}' lacks attn/q_einsum, "
                             f"attn/kv_einsum or mlp/linear ({e!r}); pass the Gemma params dict") from None
        bias = bias or "bias" in blk["attn"] or "bias" in blk["mlp"]
    def per_layer(v: list[int], full: int) -> tuple[int, ...] | None:
        return None if v == [full] * cfg.layers else tuple(v)

    return replace(cfg, layer_heads=per_layer(heads, cfg.heads), layer_ffn=per_layer(ffn, cfg.ffn),
                   layer_kv_heads=per_layer(kv, cfg.kv_heads), out_bias=bias)


def with_out_bias(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of Gemma ``params`` with a zero ``bias`` (d,) after every attention output and MLP
    down projection (for ``GemmaConfig(out_bias=True)``: the model computes the same function until
    something, e.g. FLAP bias compensation, writes into the biases).

    >>> p = {"layer_0": {"attn": {"attn_vec_einsum": np.ones((1, 2, 3))}, "mlp": {"linear": np.ones((4, 3))}}}
    >>> with_out_bias(p)["layer_0"]["mlp"]["bias"].shape
    (3,)
    """
    out = dict(params)
    for k, blk in params.items():
        if not k.startswith("layer_"):
            continue
        attn, mlp = dict(blk["attn"]), dict(blk["mlp"])
        attn.setdefault("bias", jnp.zeros(np.shape(attn["attn_vec_einsum"])[-1], jnp.float32))
        mlp.setdefault("bias", jnp.zeros(np.shape(mlp["linear"])[-1], jnp.float32))
        out[k] = {**blk, "attn": attn, "mlp": mlp}
    return out


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """NEOX-style rotary embedding of ``x`` ``(..., T, heads, H)`` at ``positions`` ``(..., T)``:
    dimension ``j`` of the first half rotates with ``j + H/2``.

    >>> x = jnp.ones((1, 3, 1, 4)); bool(jnp.allclose(rope(x, jnp.zeros((1, 3)), 1e4), x))
    True
    """
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
    ang = positions[..., None, None].astype(jnp.float32) * freq  # (..., T, 1, half)
    sin, cos = jnp.sin(ang), jnp.cos(ang)
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    """``x / rms(x) · scale`` over the last axis (scale stored as the multiplier)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return (x * jax.lax.rsqrt(var + self.eps) * scale).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention with q/k RMSNorm, RoPE and an optional sliding window."""

    cfg: GemmaConfig
    is_global: bool
    heads: int | None = None
    kv_heads: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        c = self.cfg
        init = nn.initializers.normal(0.02)
        nq, nkv = self.heads or c.heads, self.kv_heads or c.kv_heads
        wq = self.param("q_einsum", init, (nq, c.d, c.head_dim))
        wkv = self.param("kv_einsum", init, (2, nkv, c.d, c.head_dim))
        wo = self.param("attn_vec_einsum", init, (nq, c.head_dim, c.d))
        q = jnp.einsum("BTD,NDH->BTNH", x, wq)
        k, v = jnp.einsum("BSD,CKDH->CBSKH", x, wkv)
        q = RMSNorm(c.eps, name="q_norm")(q)
        k = RMSNorm(c.eps, name="k_norm")(k)
        base = c.rope_global if self.is_global else c.rope_local
        q = rope(q, positions, base) * c.scale
        k = rope(k, positions, base)
        b, t, n, h = q.shape
        g = n // nkv
        q = q.reshape(b, t, nkv, g, h)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k)
        qpos, kpos = positions[:, None, None, :, None], positions[:, None, None, None, :]
        allowed = kpos <= qpos
        if not self.is_global:
            allowed &= qpos - kpos < c.sliding_window
        logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
        out = jnp.einsum("BTNH,NHD->BTD", out, wo)
        if c.out_bias:
            out = out + self.param("bias", nn.initializers.zeros, (c.d,))
        return out


class MLP(nn.Module):
    """GeGLU feed-forward: ``linear(gelu(gate(x)) · up(x))`` with gate/up stacked in one param."""

    cfg: GemmaConfig
    ffn: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        init = nn.initializers.normal(0.02)
        f = self.ffn or c.ffn
        wg = self.param("gating_einsum", init, (2, f, c.d))
        w2 = self.param("linear", init, (f, c.d))
        gate, up = jnp.einsum("BTD,CFD->CBTF", x, wg)
        out = jnp.einsum("BTF,FD->BTD", nn.gelu(gate, approximate=True) * up, w2)
        if c.out_bias:
            out = out + self.param("bias", nn.initializers.zeros, (c.d,))
        return out


class GemmaBlock(nn.Module):
    """One decoder block: ``x + post(attn(pre(x)))`` then ``x + post(mlp(pre(x)))``.

    Takes ``(hidden, positions)``, returns the new hidden states (so blocks chain in the sequential
    one-shot driver, which passes ``positions`` through).
    """

    cfg: GemmaConfig
    is_global: bool
    heads: int | None = None
    ffn: int | None = None
    kv_heads: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        eps = self.cfg.eps
        a = Attention(self.cfg, self.is_global, self.heads, self.kv_heads, name="attn")(
            RMSNorm(eps, name="pre_attention_norm")(x), positions)
        x = x + RMSNorm(eps, name="post_attention_norm")(a)
        f = MLP(self.cfg, self.ffn, name="mlp")(RMSNorm(eps, name="pre_ffw_norm")(x))
        return x + RMSNorm(eps, name="post_ffw_norm")(f)


class Gemma(nn.Module):
    """The Gemma 3 decoder: token ids ``(B, T)`` → logits ``(B, T, vocab)`` (``hidden=True``: the
    final-normed hidden states ``(B, T, d)`` instead, to skip the 262k-wide output matmul).

    ``keep_layers`` (a tuple of layer indices) runs only those blocks, in order — a model with
    blocks removed (params of the removed blocks are ignored)."""

    cfg: GemmaConfig
    keep_layers: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, hidden: bool = False) -> jax.Array:
        c = self.cfg
        emb = self.param("embedder", lambda k, s: {"input_embedding": nn.initializers.normal(1.0)(k, s)},
                         (c.vocab, c.d))["input_embedding"]
        x = jnp.take(emb, tokens, axis=0) * jnp.sqrt(jnp.float32(c.d)).astype(emb.dtype)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        layers = range(c.layers) if self.keep_layers is None else self.keep_layers
        for i in layers:
            x = GemmaBlock(c, c.is_global(i), c.heads_at(i), c.ffn_at(i), c.kv_heads_at(i),
                           name=f"layer_{i}")(x, positions)
        x = RMSNorm(c.eps, name="final_norm")(x)
        if hidden:
            return x
        logits = jnp.einsum("BTD,VD->BTV", x, emb)
        if c.final_softcap is not None:
            logits = jnp.tanh(logits / c.final_softcap) * c.final_softcap
        return logits


def nll_sum(model: Gemma, params: Any, tokens: jax.Array) -> jax.Array:
    """Summed next-token negative log-likelihood of ``tokens`` ``(B, T)`` (targets: ``tokens[:, 1:]``).

    >>> cfg = GemmaConfig(vocab=8, d=8, layers=1, heads=1, kv_heads=1, head_dim=4, ffn=8)
    >>> t = jnp.zeros((1, 4), jnp.int32); p = jax.jit(Gemma(cfg).init)(jax.random.key(0), t)["params"]
    >>> float(jax.jit(nll_sum, static_argnums=0)(Gemma(cfg), p, t)) > 0
    True
    """
    logits = model.apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(lse - tgt)


_nll_jit = jax.jit(nll_sum, static_argnums=0)  # one compilation per (model config, shape), shared


def perplexity(model: Gemma, params: Any, windows: Iterable[np.ndarray], batch: int = 2) -> float:
    """Token-level perplexity over windows ``(n, T+1)`` of token ids (WikiText style: every window
    scored on its ``T`` next-token targets), ``exp(Σ NLL / Σ targets)``.

    >>> cfg = GemmaConfig(vocab=8, d=8, layers=1, heads=1, kv_heads=1, head_dim=4, ffn=8)
    >>> w = np.zeros((3, 5), np.int32); p = jax.jit(Gemma(cfg).init)(jax.random.key(0), w[:1])["params"]
    >>> perplexity(Gemma(cfg), p, w) > 1.0
    True
    """
    w = np.asarray(list(windows) if not isinstance(windows, np.ndarray) else windows, np.int32)
    total = 0.0
    for i in range(0, len(w), batch):  # a shorter last chunk compiles once more
        total += float(_nll_jit(model, params, w[i:i + batch]))
    return float(np.exp(total / (w.shape[0] * (w.shape[1] - 1))))


def _logits(model: Gemma, params: Any, tokens: jax.Array) -> jax.Array:
    return model.apply({"params": params}, tokens)


_logits_jit = jax.jit(_logits, static_argnums=0)  # shared: one compilation per (config, length)


def greedy(model: Gemma, params: Any, tokens: list[int], steps: int) -> list[int]:
    """Greedy continuation of a prompt by ``steps`` tokens (for short demos).

    Runs the model on a fixed buffer of ``len(tokens) + steps`` ids (the tail padded with 0): the
    model is causal, so the logits at position ``i`` never see the padding after it, and the whole
    continuation compiles once per model config and length instead of once per step.

    >>> cfg = GemmaConfig(vocab=8, d=8, layers=1, heads=1, kv_heads=1, head_dim=4, ffn=8)
    >>> p = jax.jit(Gemma(cfg).init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    >>> len(greedy(Gemma(cfg), p, [1, 2], 2))
    4
    """
    n0 = len(tokens)
    buf = np.zeros((1, n0 + steps), np.int32)
    buf[0, :n0] = tokens
    for i in range(n0, n0 + steps):
        logits = _logits_jit(model, params, jnp.asarray(buf))
        buf[0, i] = int(jnp.argmax(logits[0, i - 1]))
    return [int(t) for t in buf[0]]
