"""Layer (block) pruning: angular distance / block influence against a numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.structured import block_scores, choose_blocks, drop_blocks
from jaxprune.zoo.models.toy_transformer import ToyConfig, ToyGPT, config_from_params

CFG = ToyConfig(vocab=11, d_model=16, n_layers=3, n_heads=2, n_kv_heads=2, head_dim=4, d_ff=16,
                max_len=8)


def _model():
    m = ToyGPT(CFG)
    x = jax.random.randint(jax.random.key(1), (4, 8), 0, 11)
    v = m.init(jax.random.key(0), x)
    return m, v, x


@pytest.mark.parametrize("jit", [True, False])
def test_scores_match_reference(jit):
    m, v, x = _model()
    captured = {}


    _, state = m.apply(v, x, capture_intermediates=lambda mdl, _: mdl.name is not None
                       and mdl.name.startswith("Block_"), mutable=["intermediates"])
    for i in range(3):
        captured[i] = np.asarray(state["intermediates"][f"Block_{i}"]["__call__"][0])
    sc = block_scores(m.apply, v, [x[:2], x[2:]], jit=jit)  # two batches: sums accumulate
    assert [s.index for s in sc] == [0, 1, 2]
    emb = np.asarray(v["params"]["embed"]["embedding"])[np.asarray(x)] + np.asarray(
        v["params"]["pos"])[None, :8]
    ins = [emb, captured[0], captured[1]]
    for i, s in enumerate(sc):
        a, b = ins[i].reshape(-1, 16), captured[i].reshape(-1, 16)
        cos = np.clip((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)), -1, 1)
        np.testing.assert_allclose(s.angular, np.mean(np.arccos(cos) / np.pi), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.influence, np.mean(1 - cos), rtol=1e-4, atol=1e-6)


def test_identity_block_is_removed_and_model_unchanged():
    m, v, x = _model()
    p = jax.tree.map(lambda a: a, v)
    blk = p["params"]["Block_1"]
    for name in ("attn/o", "ffn/down"):
        a, b = name.split("/")
        blk[a][b] = jax.tree.map(jnp.zeros_like, blk[a][b])  # block 1 is now the identity
    sc = block_scores(m.apply, p, [x])
    assert sc[1].angular < 1e-3 and sc[1].influence < 1e-6
    rm = choose_blocks(sc, 1, "angular")
    assert rm == [1] and choose_blocks(sc, 1, "influence") == [1]
    small = drop_blocks(p, rm)
    cfg2 = config_from_params(CFG, small["params"])
    assert cfg2.n_layers == 2
    np.testing.assert_allclose(ToyGPT(cfg2).apply(small, x), m.apply(p, x), atol=1e-4)
    # the renumbered Block_1 is the old Block_2
    np.testing.assert_array_equal(small["params"]["Block_1"]["attn"]["q"]["kernel"],
                                  p["params"]["Block_2"]["attn"]["q"]["kernel"])


def test_last_baseline_and_bad_input():
    m, v, x = _model()
    sc = block_scores(m.apply, v, [x])
    assert choose_blocks(sc, 2, "last") == [1, 2]
    with pytest.raises(ValueError, match="removing every block"):
        choose_blocks(sc, 3)
    with pytest.raises(ValueError, match="unknown metric"):
        choose_blocks(sc, 1, "random")
    with pytest.raises(ValueError, match="no block 'Block_7'"):
        drop_blocks(v, [7])
    with pytest.raises(ValueError, match="no module name matched"):
        block_scores(m.apply, v, [x], pattern=r"^Layer_(\d+)$")


def test_drop_blocks_without_renumbering_keeps_original_names():
    v = {"params": {"Block_0": {"w": 0}, "Block_1": {"w": 1}, "Block_2": {"w": 2}, "head": 3},
         "cache": {"Block_1": 5, "Block_2": 6}}
    out = drop_blocks(v, [0, 1], renumber=False)
    assert out == {"params": {"Block_2": {"w": 2}, "head": 3}, "cache": {"Block_2": 6}}
    assert drop_blocks(v, [0, 1])["params"] == {"Block_0": {"w": 2}, "head": 3}
    with pytest.raises(ValueError, match="refusing to remove every block"):
        drop_blocks(v, [0, 1, 2], renumber=False)
