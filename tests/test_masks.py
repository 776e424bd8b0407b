"""Masks over arbitrary pytrees: structure, filters, apply, stats, and mismatch errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.core.filters import select
from jaxprune.core.masks import leaves_with_paths, tree_map_masked
from jaxprune.zoo.models import CNN, NnxCNN


def _linen_params():
    return CNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]


@pytest.mark.parametrize(
    "params",
    [
        {"a": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}},
        [jnp.ones((4, 4)), (jnp.ones((2, 2)), jnp.ones(3))],
    ],
)
def test_masks_mirror_plain_trees(params):
    m = jp.init_masks(params, select(names=None))
    assert jax.tree.structure(m, is_leaf=lambda x: x is None) == jax.tree.structure(params)
    for (pp, p), (mp, mm) in zip(leaves_with_paths(params), leaves_with_paths(m), strict=True):
        assert pp == mp
        assert (mm is None) == (p.ndim < 2)


def test_linen_and_nnx_same_paths():
    lp = _linen_params()
    ml = jp.init_masks(lp)
    assert [p for p, m in leaves_with_paths(ml) if m is not None] == [
        "Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel", "Dense_1/kernel"]
    st = nnx.state(NnxCNN(rngs=nnx.Rngs(0)), nnx.Param)
    mn = jp.init_masks(st)
    assert type(mn) is type(st)
    paths = [p for p, m in leaves_with_paths(mn) if m is not None]
    assert paths == ["convs/0/kernel", "convs/1/kernel", "fc1/kernel", "fc2/kernel"]


def test_none_masks_map_without_error():
    # JAX treats None as an empty subtree; a naive jax.tree.map(f, params, masks) fails.
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    masks = {"w": jnp.array([[True, False], [False, True]]), "b": None}
    with pytest.raises((ValueError, TypeError)):
        jax.tree.map(lambda m, p: p, masks, params)
    out = jp.apply_masks(params, masks)
    np.testing.assert_array_equal(out["w"], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(out["b"], [1, 1])
    assert tree_map_masked(lambda m: m is None, masks) == {"w": False, "b": True}


def test_filters():
    f = select(names=("kernel",), include="Conv", exclude="Conv_1")
    p = _linen_params()
    m = jp.init_masks(p, f)
    assert [k for k, v in leaves_with_paths(m) if v is not None] == ["Conv_0/kernel"]
    f_ndim = select(names=None, min_ndim=4)
    m = jp.init_masks(p, f_ndim)
    assert [k for k, v in leaves_with_paths(m) if v is not None] == ["Conv_0/kernel",
                                                                      "Conv_1/kernel"]
    f_pred = select(names=None, min_ndim=0, predicate=lambda path, x: x.size > 1000)
    m = jp.init_masks(p, f_pred)
    assert all(v is None or v.size > 1000 for _, v in leaves_with_paths(m))


def test_stats_and_table():
    params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.ones(3)}
    masks = {"w": jnp.array([[True, False, True, False]] * 2), "b": None}
    st = {s.path: s for s in jp.sparsity_stats(params, masks)}
    assert st["w"].zeros == 4 and st["w"].sparsity == 0.5 and st["w"].pruned
    assert not st["b"].pruned and st["b"].zeros == 0
    assert jp.total_sparsity(params, masks) == 0.5
    assert jp.total_sparsity(params, masks, pruned_only=False) == 4 / 11
    table = jp.summary_table(params, masks)
    assert "w" in table and "50.00%" in table and table.splitlines()[-1].startswith("total")


def test_mismatch_names_first_differing_path():
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    bad = {"a": {"kernel": None}, "c": {"kernel": None}}
    with pytest.raises(ValueError, match="params has 'b/kernel' where masks has 'c/kernel'"):
        jp.check_masks(params, bad)
    with pytest.raises(ValueError, match="'b/kernel' exists only in params"):
        jp.check_masks(params, {"a": {"kernel": None}})
    with pytest.raises(ValueError, match="mask for 'a/kernel' has shape"):
        jp.check_masks(params, {"a": {"kernel": jnp.ones((3,), bool)}, "b": {"kernel": None}})


def test_non_float_leaf_selected_raises():
    params = {"step": {"kernel": jnp.ones((2, 2), jnp.int32)}}
    with pytest.raises(TypeError, match="'step/kernel'.*int32"):
        jp.init_masks(params)
