"""Export: pruned linen params + masks → packed params; packed model == masked dense model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.kernels import export, formats
from jaxprune.zoo.models.small import MLP


@pytest.fixture(scope="module")
def model_and_params():
    model = MLP(features=(16, 8))
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    return model, params


@pytest.mark.parametrize("pattern,fmt", [
    ("2:4", formats.NMPacked),
    (jp.Block(4, 8), formats.BlockSparse),
    ("unstructured", formats.Bitmask),
])
def test_packed_model_equals_masked_model(model_and_params, pattern, fmt):
    model, params = model_and_params
    pruned, masks = jp.prune(params, 0.5, pattern=pattern)
    packed = export.pack_params(pruned, masks, pattern)
    assert isinstance(packed["Dense_0"]["kernel"], fmt)
    assert isinstance(packed["Dense_0"]["bias"], jax.Array)  # unmasked leaves stay dense
    x = jax.random.normal(jax.random.key(1), (5, 64))
    y = jax.jit(lambda p, x: export.apply_packed(model, {"params": p}, x))(packed, x)
    y_ref = model.apply({"params": pruned}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)


def test_per_leaf_patterns(model_and_params):
    model, params = model_and_params
    pattern = jp.PerLeaf(rules=(("Dense_0", jp.NM(2, 4)),), default=jp.Block(8, 4))
    pruned, masks = jp.prune(params, 0.5, pattern=pattern)
    packed = export.pack_params(pruned, masks, pattern)
    assert isinstance(packed["Dense_0"]["kernel"], formats.NMPacked)
    assert isinstance(packed["Dense_1"]["kernel"], formats.BlockSparse)
    x = jax.random.normal(jax.random.key(2), (3, 64))
    y = jax.jit(lambda p, x: export.apply_packed(model, {"params": p}, x))(packed, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model.apply({"params": pruned}, x)),
                               rtol=1e-5, atol=1e-5)


def test_pack_params_errors_name_the_leaf(model_and_params):
    _, params = model_and_params
    _, masks = jp.prune(params, 0.5)  # unstructured masks: not 2:4 valid
    with pytest.raises(ValueError, match=r"leaf 'Dense_0/kernel'.*not 2:4 valid"):
        export.pack_params(params, masks, "2:4")
    _, masks = jp.prune(params, 0.5, pattern=jp.NM(2, 4, axis=1))
    with pytest.raises(ValueError, match="contraction axis"):
        export.pack_params(params, masks, jp.NM(2, 4, axis=1))
    with pytest.raises(ValueError, match="does not match"):
        export.pack_params(params, {"Dense_0": None}, "2:4")


def test_packed_matmul_dispatch():
    w = jnp.arange(16.0).reshape(4, 4)
    mask = jnp.eye(4, dtype=bool)
    x = jnp.ones((2, 4))
    expect = x @ jnp.where(mask, w, 0)
    for p in (formats.pack_nm(w, mask), formats.pack_block(w, mask, (2, 2)),
              formats.pack_bitmask(w, mask)):
        y = jax.jit(export.packed_matmul)(x, p)
        np.testing.assert_allclose(np.asarray(y), np.asarray(expect), rtol=1e-6)
