"""The sequential driver equals: prune block 1, re-run the model, prune block 2."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from jaxprune.core import filters
from jaxprune.oneshot.calibration import calibrate
from jaxprune.oneshot.methods import get_method
from jaxprune.oneshot.sequential import BlockSpec, prune_layers, prune_sequential


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(8, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(name="block_1")(Block(name="block_0")(x))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "sparsegpt+dsnot"])
def test_two_blocks_equal_manual(method):
    fn = get_method(method)
    model = Two()
    xs = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(3)]
    params = model.init(jax.random.key(9), xs[0])["params"]
    blocks = [BlockSpec("block_0", Block()), BlockSpec("block_1", Block())]
    got, masks = prune_sequential(params, blocks, xs, fn, 0.5, progress=False)

    def manual_step(p, prefix):
        st = calibrate(model, p, xs)
        st = {k: v for k, v in st.items() if k.startswith(prefix)}
        return prune_layers(p, st, fn, 0.5)

    p1, _ = manual_step(params, "block_0")
    p2, ms = manual_step(p1, "block_1")
    assert ms["block_0"]["fc1"]["kernel"] is None  # no stats given for block_0 in this step
    for path in ["block_0/fc1/kernel", "block_0/fc2/kernel", "block_1/fc1/kernel"]:
        a, b = path.split("/")[0], path.split("/")[1]
        np.testing.assert_allclose(got[a][b]["kernel"], p2[a][b]["kernel"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(masks["block_1"]["fc2"]["kernel"], ms["block_1"]["fc2"]["kernel"])
    assert masks["block_0"]["fc1"]["bias"] is None
    assert abs(float(1 - masks["block_1"]["fc1"]["kernel"].mean()) - 0.5) < 1e-6


def test_dense_inputs_equal_one_calibration():
    model = Two()
    xs = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(2)]
    params = model.init(jax.random.key(9), xs[0])["params"]
    blocks = [BlockSpec("block_0", Block()), BlockSpec("block_1", Block())]
    fn = get_method("sparsegpt")
    got, _ = prune_sequential(params, blocks, xs, fn, pattern="2:4", dense_inputs=True,
                              progress=False)
    want, _ = prune_layers(params, calibrate(model, params, xs), fn, pattern="2:4")
    np.testing.assert_allclose(got["block_1"]["fc2"]["kernel"], want["block_1"]["fc2"]["kernel"],
                               rtol=1e-5, atol=1e-5)


def test_filter_targets_and_errors():
    model = Two()
    xs = [jax.random.normal(jax.random.key(0), (16, 8))]
    params = model.init(jax.random.key(9), xs[0])["params"]
    blocks = [BlockSpec("block_0", Block()), BlockSpec("block_1", Block())]
    _, masks = prune_sequential(params, blocks, xs, get_method("magnitude"), 0.5,
                                filter=lambda p, w: "fc2" not in p,
                                sparsities={"block_1/fc1/kernel": 0.25}, progress=False)
    assert masks["block_0"]["fc2"]["kernel"] is None
    assert abs(float(1 - masks["block_1"]["fc1"]["kernel"].mean()) - 0.25) < 1e-6
    assert abs(float(1 - masks["block_0"]["fc1"]["kernel"].mean()) - 0.5) < 1e-6
    # a core filter value and a method name work the same
    _, m2 = prune_sequential(params, blocks, xs, "magnitude", 0.5,
                             filter=~filters.PathRegex("fc2"),
                             sparsities={"block_1/fc1/kernel": 0.25}, progress=False)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(m2), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="needs an explicit sparsity"):
        prune_sequential(params, blocks, xs, "wanda")
    with pytest.raises(ValueError, match=r"sparsities=.*block_7/fc1/kernel.*not in the params"):
        prune_sequential(params, blocks, xs, "wanda", 0.5, sparsities={"block_7/fc1/kernel": 0.2})
    with pytest.raises(ValueError, match=r"sparsities=.*block_0/fc1/bias.*not calibrated"):
        prune_sequential(params, blocks, xs, "wanda", 0.5, sparsities={"block_0/fc1/bias": 0.2},
                         progress=False)
    with pytest.raises(ValueError, match="block_1/fc1/kernel.*1.0"):
        prune_sequential(params, blocks, xs, "wanda", 0.5, sparsities={"block_1/fc1/kernel": 1.0})
    with pytest.raises(TypeError, match="LayerMethod"):
        prune_sequential(params, blocks, xs, lambda *a, **k: None, 0.5)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        prune_sequential(params, blocks, [], get_method("wanda"), 0.5)
    with pytest.raises(ValueError, match="unknown one-shot method"):
        get_method("nope")
    with pytest.raises(KeyError, match="block_9"):
        prune_sequential(params, [BlockSpec("block_9", Block())], xs, get_method("wanda"), 0.5)


def test_prune_layers_mask_tree_and_gram_from_needs():
    model = Two()
    xs = [jax.random.normal(jax.random.key(0), (16, 8))]
    params = model.init(jax.random.key(9), xs[0])["params"]
    st = calibrate(model, params, xs, gram=False)
    _, masks = prune_layers(params, st, "wanda", pattern="2:4", filter="block_1")
    assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(
        jax.tree.map(lambda _: 0, params))
    assert masks["block_0"]["fc1"]["kernel"] is None and masks["block_1"]["fc1"]["bias"] is None
    assert float(masks["block_1"]["fc2"]["kernel"].mean()) == 0.5
    with pytest.raises(ValueError, match="gram=True"):
        prune_layers(params, st, "sparsegpt", 0.5)
    assert "gram" not in get_method("wanda").needs and "gram" in get_method("wanda+dsnot").needs
