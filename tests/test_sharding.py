"""Sharded sparse training: 8-device mesh == 1 device, masks sharded like params, restore on a
different mesh, indivisible dims."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxprune as jp
from jaxprune.core.masks import leaves_with_paths
from jaxprune.io import checkpoint as ck
from jaxprune.io import sharding as shd
from jaxprune.zoo.loops import cross_entropy
from jaxprune.zoo.models import MLP

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")

_X = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
_Y = (np.abs(_X[:, :4]).argmax(1)).astype(np.int32)
MODEL = MLP(features=(32, 32, 4))


def batch_at(i: int):
    idx = np.random.default_rng(1000 + i).integers(0, len(_X), 16)
    return _X[idx], _Y[idx]


def loss_fn(params, batch, rng):
    x, y = batch
    return cross_entropy(MODEL.apply({"params": params}, x), y)


def make_tx(allocation):
    if allocation == "rigl":
        from jaxprune.training.dst import rigl

        return rigl(optax.adam(1e-2), sparsity=0.8, update_period=2, total_steps=8,
                    key=jax.random.key(3))
    return jp.pruner(optax.adam(1e-2), schedule=jp.Polynomial(0.8, begin=0, end=6, freq=2),
                     allocation=allocation)


def train(mesh, allocation, steps=8):
    params = MODEL.init(jax.random.key(0), _X[:1])["params"]
    tx = make_tx(allocation)
    state, sh = shd.init_train_state(params, tx, mesh, seed=0)
    bsh = shd.batch_sharding(mesh)
    step = shd.make_sharded_train_step(loss_fn, tx, sh, bsh)
    for i in range(steps):
        state, _ = step(state, shd.shard_batch(batch_at(i), bsh))
    return state


@pytest.mark.parametrize("allocation", ["uniform", jp.Global(min_density=0.05), "rigl"])
def test_sharded_matches_single_device_and_masks_follow_params(allocation):
    mesh8 = shd.make_mesh(2, 4)
    mesh1 = shd.make_mesh(1, 1)
    s8 = train(mesh8, allocation)
    s1 = train(mesh1, allocation)
    for (p, a), (_, b) in zip(leaves_with_paths(s8.params), leaves_with_paths(s1.params),
                              strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=p)
    m8, m1 = jp.get_masks(s8.opt_state), jp.get_masks(s1.opt_state)
    for (p, a), (_, b) in zip(leaves_with_paths(m8), leaves_with_paths(m1), strict=True):
        if a is None:
            assert b is None
            continue
        assert (np.asarray(a) == np.asarray(b)).mean() > 0.999, p
    assert jp.total_sparsity(s8.params, m8) == pytest.approx(0.8, abs=0.01)
    # masks and Adam moments carry exactly their param's sharding, and the kernels are split
    adam = s8.opt_state.inner_state[0]
    for (p, m), (_, w), (_, mu) in zip(leaves_with_paths(m8), leaves_with_paths(s8.params),
                                       leaves_with_paths(adam.mu), strict=True):
        assert mu.sharding == w.sharding, p
        if m is not None:
            assert m.sharding == w.sharding, p
            assert w.sharding.spec == P(None, "model"), p
            assert len(w.addressable_shards) == 8


def test_indivisible_dim_errors_or_replicates():
    mesh = shd.make_mesh(1, 8)
    params = {"odd": {"kernel": jnp.ones((4, 6))}, "ok": {"kernel": jnp.ones((4, 16))}}
    with pytest.raises(ValueError, match="'odd/kernel'.*dim 1.*'model' of size 8"):
        shd.param_specs(params, mesh)
    specs = shd.param_specs(params, mesh, indivisible="replicate")
    assert specs["odd"]["kernel"] == P() and specs["ok"]["kernel"] == P(None, "model")
    rules = (("ok", P("model", None)),)
    with pytest.raises(ValueError, match="'ok/kernel'.*dim 0"):
        shd.param_specs({"ok": {"kernel": jnp.ones((4, 16))}}, mesh, rules=rules)
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.make_mesh(4, 4)


def test_restore_onto_different_mesh(tmp_path):
    s1 = train(shd.make_mesh(1, 1), "uniform", steps=3)
    with ck.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(3, s1)
        params = MODEL.init(jax.random.key(1), _X[:1])["params"]
        template, sh = shd.init_train_state(params, make_tx("uniform"), shd.make_mesh(2, 4))
        restored, _ = mgr.restore(template)
    for (p, a), (_, b), (_, s) in zip(leaves_with_paths(restored), leaves_with_paths(s1),
                                      leaves_with_paths(sh), strict=True):
        if a is None:
            continue
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        else:
            assert a.sharding == s, p
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
    # and training continues on the new mesh
    bsh = shd.batch_sharding(shd.make_mesh(2, 4))
    step = shd.make_sharded_train_step(loss_fn, make_tx("uniform"), sh, bsh)
    out, loss = step(restored, shd.shard_batch(batch_at(3), bsh))
    assert int(out.step) == 4 and np.isfinite(float(loss))


def test_sharded_step_with_host_told_mask_updates():
    """make_sharded_train_step's static mask_update: RigL told its update steps on the host gives
    the masks and params of the device-side schedule, on a 2x4 mesh."""
    mesh = shd.make_mesh(2, 4)
    out = []
    for hinted in (False, True):
        params = MODEL.init(jax.random.key(0), _X[:1])["params"]
        tx = make_tx("rigl")
        state, sh = shd.init_train_state(params, tx, mesh, seed=0)
        bsh = shd.batch_sharding(mesh)
        step = shd.make_sharded_train_step(loss_fn, tx, sh, bsh)
        for i in range(6):
            hint = (i % 2 == 0) if hinted else None
            state, _ = step(state, shd.shard_batch(batch_at(i), bsh), mask_update=hint)
        out.append(state)
    init = jp.get_masks(tx.init(params))
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(
        leaves_with_paths(init), leaves_with_paths(jp.get_masks(out[1].opt_state)), strict=True)
        if a is not None)  # the masks did move
    for (p, a), (_, b) in zip(leaves_with_paths(jp.get_masks(out[0].opt_state)),
                              leaves_with_paths(jp.get_masks(out[1].opt_state)), strict=True):
        assert (a is None and b is None) or bool(np.array_equal(a, b)), p
    for (p, a), (_, b) in zip(leaves_with_paths(out[0].params), leaves_with_paths(out[1].params),
                              strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=p)
