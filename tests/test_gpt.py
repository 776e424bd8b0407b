"""GPT model, stdlib byte data and the one-shot driver on a tiny GPT."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.data import text_tfds
from jaxprune.models.gpt import GPT, GPTConfig, blocks, loss_fn, perplexity
from jaxprune.oneshot import get_method, prune_sequential


def test_gpt_causal_and_rope():
    for pos in ("learned", "rope"):
        cfg = GPTConfig(d=16, layers=2, heads=2, seq=8, pos=pos)
        x = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
        p = GPT(cfg).init(jax.random.key(1), x)["params"]
        y = GPT(cfg).apply({"params": p}, x)
        y2 = GPT(cfg).apply({"params": p}, x.at[:, 5].set(7))
        np.testing.assert_allclose(y[:, :5], y2[:, :5], atol=1e-5)  # no look-ahead
        assert ("pos" in p["embed"]) == (pos == "learned")


def test_stdlib_bytes_split_deterministic_and_disjoint(tmp_path):
    a = text_tfds.split_bytes("validation", 5000)
    assert a.shape == (19, 257) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, text_tfds.split_bytes("validation", 5000))
    files = text_tfds.stdlib_files()
    va = {f for f in files if text_tfds.split_of(f) == "validation"}
    assert 0 < len(va) < len(files) // 5


def test_sequential_on_tiny_gpt_matches_perplexity_order():
    cfg = GPTConfig(d=16, layers=2, heads=2, seq=16)
    rec = text_tfds.split_bytes("train", 40 * 257)[:, :17]
    p = GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    calib = [rec[i:i + 8, :-1].astype(np.int32) for i in range(0, 32, 8)]
    pruned, masks = prune_sequential(p, blocks(cfg), calib, get_method("sparsegpt"), "2:4",
                                     progress=False)
    assert masks["head"]["lm_head"]["kernel"] is None  # head not pruned
    k = masks["block_1"]["fc2"]["kernel"]
    assert float(k.mean()) == 0.5
    assert np.isfinite(perplexity(GPT(cfg), pruned, rec))
    assert float(loss_fn(GPT(cfg), pruned, rec)) > 0
