"""A small mixture-of-experts byte decoder (linen): top-k routing, experts stacked on an expert axis.

Each block is pre-norm causal attention followed by an MoE feed-forward layer written the way JAX
MoE code is (GShard / Switch style dense dispatch): a router ``(d, E)`` gives per-token logits, the
softmax probabilities' top ``k`` experts are chosen and their probabilities renormalised to gates,
tokens are dispatched into per-expert buffers by a one-hot ``dispatch`` tensor ``(b, t, E, C)``
(capacity ``C`` = the sequence length: no token is ever dropped), the experts run as *batched*
einsums over stacked weights ``w_in (E, d, f)`` and ``w_out (E, f, d)`` — the expert axis is a batch
axis of the expert matmuls — and a ``combine`` tensor (dispatch × gate) sums them back. The
load-balancing loss (Switch: ``E · Σ_e f_e · P_e``) is sown into ``intermediates``.

Parameter layout: ``embed/{tok,pos}``, ``block_i/{ln1,ln2,q_proj,k_proj,v_proj,o_proj}``,
``block_i/moe/{router,w_in,w_out}``, ``head/{ln,lm_head}``. A model whose experts were removed is
again an :class:`MoE` (``experts`` per layer: :func:`config_from_params`).

``expert_keep`` (optional ``(layers, E)`` bool) removes experts from routing (their logits become
``-inf``) without changing shapes: the reference a slimmed model must equal.

Example:
    >>> cfg = MoEConfig(d=16, layers=1, heads=2, experts=4, ffn=8, seq=8)
    >>> x = jnp.zeros((2, 8), jnp.int32)
    >>> p = jax.eval_shape(MoE(cfg).init, jax.random.key(0), x)["params"]   # shapes only
    >>> p["block_0"]["moe"]["w_in"].shape, jax.eval_shape(MoE(cfg).apply, {"params": p}, x).shape
    ((4, 16, 8), (2, 8, 256))
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxprune.zoo.models.gpt import GPTConfig, GPTEmbed, GPTHead, batched_perplexity

__all__ = ["MoEConfig", "MoE", "MoEFFN", "LoopMoEFFN", "route", "config_from_params", "loss_fn",
           "perplexity"]


#: the fields an MoE shares with :class:`GPTConfig` (its embedding, attention and head)
SHARED = ("vocab", "d", "layers", "heads", "seq")


class _Fields(NamedTuple):
    attention: GPTConfig
    experts: int = 8
    top_k: int = 2
    ffn: int = 128
    layer_experts: tuple[int, ...] | None = None


class MoEConfig(_Fields):
    """Hyper-parameters: a :class:`GPTConfig` for the embedding, attention and head (``vocab``,
    ``d``, ``layers``, ``heads``, ``seq``, given and read flat) plus the experts; ``layer_experts``
    (one count per layer) after experts were removed.

    >>> c = MoEConfig(layers=2, layer_experts=[6, 4])
    >>> c.n_experts(1), c.d, c.gpt().layers
    (4, 64, 2)
    >>> MoEConfig(**c._asdict()) == c
    True
    """

    __slots__ = ()

    def __new__(cls, attention: GPTConfig | None = None, experts: int = 8, top_k: int = 2,
                ffn: int = 128, layer_experts: Any = None, **shared: Any) -> MoEConfig:
        unknown = sorted(set(shared) - set(SHARED))
        if unknown:
            raise TypeError(f"jaxprune.zoo.models.moe.MoEConfig: unknown fields {unknown} "
                            f"(the GPT part takes {list(SHARED)})")
        base = GPTConfig(d=64, layers=2, seq=64) if attention is None else attention
        attention = base._replace(**shared) if shared else base
        le = None if layer_experts is None else tuple(int(n) for n in layer_experts)
        if le is not None and (len(le) != attention.layers or min(le) < top_k):
            raise ValueError(f"jaxprune.zoo.models.moe.MoEConfig: layer_experts needs one count >= "
                             f"top_k={top_k} per layer ({attention.layers}), got {le}")
        return super().__new__(cls, attention, experts, top_k, ffn, le)

    def __getattr__(self, name: str) -> Any:
        if name in SHARED:
            return getattr(self.attention, name)
        raise AttributeError(f"'MoEConfig' object has no attribute {name!r}")

    def _asdict(self) -> dict[str, Any]:  # flat, as the constructor takes it (JSON round trip)
        rest = {k: v for k, v in super()._asdict().items() if k != "attention"}
        return {**{k: getattr(self.attention, k) for k in SHARED}, **rest}

    def _replace(self, **kwargs: Any) -> MoEConfig:
        return type(self)(**{**self._asdict(), **kwargs})

    def n_experts(self, i: int) -> int:
        """Number of experts of layer ``i``."""
        return self.experts if self.layer_experts is None else self.layer_experts[i]

    def gpt(self) -> GPTConfig:
        """The attention/embedding part as a :class:`GPTConfig` (shared embedding and head)."""
        return self.attention


def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``(gates, probs)``: softmax probabilities ``(..., E)`` and dense top-``k`` gates (the chosen
    experts' probabilities renormalised to sum to 1, zero elsewhere).

    >>> g, p = route(jnp.log(jnp.array([[0.5, 0.3, 0.2]])), 2)
    >>> np.round(np.asarray(g), 3).tolist()
    [[0.625, 0.375, 0.0]]
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    top_v, top_i = jax.lax.top_k(probs, k)
    chosen = jax.nn.one_hot(top_i, logits.shape[-1], dtype=probs.dtype)        # (..., k, E)
    gates = jnp.einsum("...k,...ke->...e", top_v / top_v.sum(-1, keepdims=True), chosen)
    return gates, probs


class MoEFFN(nn.Module):
    """Top-``k`` MoE FFN over stacked experts, dense dispatch (capacity = sequence length)."""

    experts: int
    ffn: int
    top_k: int = 2

    @nn.compact
    def __call__(self, h: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        b, t, d = h.shape
        e, f = self.experts, self.ffn
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        router = self.param("router", nn.initializers.normal(0.02), (d, e))
        w_in = self.param("w_in", init, (e, d, f))
        w_out = self.param("w_out", init, (e, f, d))
        logits = jnp.einsum("btd,de->bte", h, router)
        if keep is not None:
            logits = jnp.where(keep, logits, -jnp.inf)
        gates, probs = route(logits, self.top_k)
        routed = (gates > 0).astype(h.dtype)                                     # (b, t, E)
        slot = jnp.cumsum(routed, axis=1).astype(jnp.int32) - 1                 # position in buffer
        dispatch = routed[..., None] * jax.nn.one_hot(slot, t, dtype=h.dtype)    # (b, t, E, C)
        combine = dispatch * gates[..., None].astype(h.dtype)
        xe = jnp.einsum("btd,btec->becd", h, dispatch)
        he = jax.nn.gelu(jnp.einsum("becd,edf->becf", xe, w_in))
        ye = jnp.einsum("becf,efd->becd", he, w_out)
        frac = routed.mean(axis=(0, 1)) / self.top_k
        self.sow("intermediates", "aux_loss", e * jnp.sum(frac * probs.mean(axis=(0, 1))))
        return jnp.einsum("becd,btec->btd", ye, combine)


class LoopMoEFFN(nn.Module):
    """The same MoE written differently: a Python loop over separate expert ``Dense`` modules, each
    applied to every token and weighted by its gate (for tests of expert discovery)."""

    experts: int
    ffn: int
    top_k: int = 2

    @nn.compact
    def __call__(self, h: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        logits = nn.Dense(self.experts, use_bias=False, name="router")(h)
        if keep is not None:
            logits = jnp.where(keep, logits, -jnp.inf)
        gates, _ = route(logits, self.top_k)
        out = jnp.zeros_like(h)
        for i in range(self.experts):
            y = nn.Dense(h.shape[-1], use_bias=False, name=f"expert_{i}_out")(
                jax.nn.gelu(nn.Dense(self.ffn, use_bias=False, name=f"expert_{i}_in")(h)))
            out = out + gates[..., i:i + 1].astype(h.dtype) * y
        return out


class MoEBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + moe(ln2(x))``."""

    cfg: MoEConfig
    index: int = 0
    loop: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        c = self.cfg
        b, t, d = x.shape
        nh, hd = c.heads, c.d // c.heads
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(d, name=f"{n}_proj")(h).reshape(b, t, nh, hd) for n in "qkv")
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
        x = x + nn.Dense(d, name="o_proj")(a)
        ffn = LoopMoEFFN if self.loop else MoEFFN
        return x + ffn(c.n_experts(self.index), c.ffn, c.top_k, name="moe")(nn.LayerNorm(name="ln2")(x),
                                                                               keep)


class MoE(nn.Module):
    """``tokens (b, t) int -> logits (b, t, vocab)``; ``expert_keep`` ``(layers, E)`` masks routing."""

    cfg: MoEConfig = MoEConfig()
    loop: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, expert_keep: Any = None) -> jax.Array:
        x = GPTEmbed(self.cfg.gpt(), name="embed")(tokens)
        for i in range(self.cfg.layers):
            keep = None if expert_keep is None else expert_keep[i]
            x = MoEBlock(self.cfg, i, self.loop, name=f"block_{i}")(x, keep)
        return GPTHead(self.cfg.gpt(), name="head")(x)


def config_from_params(cfg: MoEConfig, params: Any) -> MoEConfig:
    """The config of (slim) ``params``: experts per layer read off the stacked expert weights.

    >>> cfg = MoEConfig(d=16, layers=2, heads=2, experts=4, ffn=8, seq=8)
    >>> p = jax.eval_shape(MoE(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> config_from_params(cfg, p) == cfg
    True
    """
    names = sorted((k for k in params if re.fullmatch(r"block_\d+", k)), key=lambda k: int(k[6:]))
    ne = tuple(int(np.shape(params[k]["moe"]["w_in"])[0]) for k in names)
    return cfg._replace(layers=len(names), layer_experts=None if set(ne) <= {cfg.experts} else ne)


def loss_fn(model: MoE, params: Any, records: jax.Array, aux_weight: float = 0.0) -> jax.Array:
    """Mean next-byte cross-entropy (nats) of ``records (b, t+1)``, plus ``aux_weight`` × the mean
    load-balancing loss of the MoE layers.

    >>> cfg = MoEConfig(d=16, layers=1, heads=2, experts=4, ffn=8, seq=8)
    >>> s = jax.eval_shape(MoE(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    >>> jax.eval_shape(lambda p: loss_fn(MoE(cfg), p, jnp.zeros((2, 9), jnp.int32), 0.01), s).shape
    ()
    """
    records = jnp.asarray(records, jnp.int32)
    logits, st = model.apply({"params": params}, records[:, :-1], mutable=["intermediates"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.mean(jnp.take_along_axis(logp, records[:, 1:, None], -1))
    aux = jax.tree_util.tree_leaves(st.get("intermediates", {}))
    return nll + aux_weight * (sum(aux) / len(aux) if aux else 0.0)


_loss_jit = jax.jit(lambda model, p, r: loss_fn(model, p, r), static_argnums=0)


def perplexity(model: MoE, params: Any, records: Iterable[np.ndarray] | np.ndarray, batch: int = 64) -> float:
    """Byte-level perplexity ``exp(mean NLL)`` over all records.

    >>> perplexity(MoE(MoEConfig()), {}, np.zeros((0, 65), np.uint8))   # no records: exp(0)
    1.0
    """
    return batched_perplexity(lambda r: _loss_jit(model, params, r), records, batch)
