"""GPT model, stdlib byte data and the one-shot driver on a tiny GPT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.oneshot import get_method, prune_sequential
from jaxprune.zoo.data import text_tfds
from jaxprune.zoo.models.gpt import GPT, GPTConfig, blocks, loss_fn, perplexity


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
    pruned, masks = prune_sequential(p, blocks(cfg), calib, get_method("sparsegpt"),
                                     pattern="2:4", progress=False)
    assert masks["head"]["lm_head"]["kernel"] is None  # head not pruned
    k = masks["block_1"]["fc2"]["kernel"]
    assert float(k.mean()) == 0.5
    assert np.isfinite(perplexity(GPT(cfg), pruned, rec))
    assert float(loss_fn(GPT(cfg), pruned, rec)) > 0


def _head_ffn_groups(groups):
    """Head groups (leading factor of o_proj's input axis) and FFN groups (fc2's input axis)."""
    out = []
    for g in groups:
        for m in g.members:
            if m.axis == 0 and ((m.path.endswith("o_proj/kernel") and len(m.sizes) > 1
                                 and m.pos == 0) or m.path.endswith("fc2/kernel")):
                out.append(g)
                break
    return out


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_slim_gpt_per_layer_heads_ffn_equals_masked(pos):
    from jaxprune.core.masks import apply_masks
    from jaxprune.structured import discover_groups, drop_blocks, group_masks, param_count, slim
    from jaxprune.zoo.models.gpt import config_from_params

    cfg = GPTConfig(d=16, layers=2, heads=4, mlp=2, seq=8, pos=pos)
    hd, m = cfg.head_dim, GPT(cfg)
    x = jax.random.randint(jax.random.key(2), (2, 8), 0, 256)
    v = m.init(jax.random.key(0), x)
    leaves, tree = jax.tree_util.tree_flatten(v)  # random biases / norms so no bug hides behind 0
    keys = jax.random.split(jax.random.key(1), len(leaves))
    v = tree.unflatten([a + 0.3 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves,
                                                                                 strict=True)])
    groups = _head_ffn_groups(discover_groups(m.apply, v, x))
    assert [(g.size, g.exact) for g in groups] == [(32, True), (4, True), (32, True), (4, True)]
    assert all(g.name.startswith("params/block_0/") for g in groups[:2])
    # layer 0: FFN 32 -> 20, heads 4 -> 1; layer 1: FFN 32 -> 7, heads 4 -> 3
    keep = {groups[0].name: np.arange(0, 32, 32 / 20).astype(int), groups[1].name: [2],
            groups[2].name: [1, 4, 9, 16, 25, 30, 31], groups[3].name: [0, 1, 3]}
    small = slim(v, groups, keep)
    scfg = config_from_params(cfg, small)
    assert scfg.layer_heads == (1, 3) and scfg.layer_ffn == (20, 7)
    ref = m.apply(apply_masks(v, group_masks(v, groups, keep)), x)
    np.testing.assert_allclose(GPT(scfg).apply(small, x), ref, atol=1e-4, rtol=1e-4)
    # exactly the removed groups: a head is q/k/v columns + biases and o rows, an FFN unit is an
    # fc1 column + bias entry and an fc2 row
    d = cfg.d
    removed_heads, removed_ffn = (4 - 1) + (4 - 3), (32 - 20) + (32 - 7)
    assert param_count(v) - param_count(small) == (removed_heads * (4 * d * hd + 3 * hd)
                                                   + removed_ffn * (2 * d + 1))
    # layer removal leaves a GPT too
    shallow = drop_blocks(small, [0], prefix="block_")
    c1 = config_from_params(scfg, shallow)
    assert (c1.layers, c1.layer_heads, c1.layer_ffn) == (1, (3,), (7,))
    assert GPT(c1).apply(shallow, x).shape == (2, 8, 256)


def test_perplexity_weights_records_not_batches_gpt_and_moe():
    """``perplexity`` (GPT and MoE share ``batched_perplexity``) = exp of the mean next-byte NLL over
    records, here from the logits in numpy; a short last batch must not count as much as a full one."""
    from jaxprune.zoo.models import moe

    rec = np.random.default_rng(0).integers(0, 256, (5, 9)).astype(np.uint8)
    gc = GPTConfig(d=16, layers=1, heads=2, seq=8)
    mc = moe.MoEConfig(d=16, layers=1, heads=2, experts=4, ffn=8, seq=8)
    rng = np.random.default_rng(1)
    for model, ppl in [(GPT(gc), perplexity), (moe.MoE(mc), moe.perplexity)]:
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        p = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
        logits = np.asarray(model.apply({"params": p}, jnp.asarray(rec[:, :-1], jnp.int32)), np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, rec[:, 1:, None].astype(int), -1)[..., 0].mean(-1)  # per record
        assert np.std(nll) > 1e-3  # records differ: batch weighting matters
        np.testing.assert_allclose(ppl(model, p, rec, batch=2), np.exp(nll.mean()), rtol=1e-4)
    assert moe.perplexity(moe.MoE(mc), {}, np.zeros((0, 9), np.uint8)) == 1.0
