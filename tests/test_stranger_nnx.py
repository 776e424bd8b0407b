"""Stranger checks with own flax nnx models: calibration of a module holding an Rngs stream,
prune_sequential on nnx blocks in train mode with ``nnx.state(model, nnx.Param)``, live nnx objects
refused by checkpoints, get_masks errors naming the nnx mistake. Oracles: numpy XᵀX of captured
inputs, the same run on the full state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import oneshot
from jaxprune.core.masks import leaves_with_paths
from jaxprune.io import compact
from jaxprune.io.checkpoint import CheckpointManager


class _DropNet(nnx.Module):
    """A Dropout with its own Rngs stream: the state holds a typed PRNG key (``key<fry>``)."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(4, 6, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.fc2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(jax.nn.relu(self.fc1(x))))


def test_calibrate_nnx_module_with_rngs_stream():
    # old code: "data type 'key<fry>' not understood" (the key's dtype was cached by its name)
    m = _DropNet(nnx.Rngs(0, dropout=1))
    m.eval()
    xs = [jax.random.normal(jax.random.key(i), (5, 4)) for i in range(2)]
    st = oneshot.calibrate(m, None, xs)
    assert set(st) == {"fc1/kernel", "fc2/kernel"}
    x = np.concatenate([np.asarray(a, np.float64) for a in xs])
    h = np.concatenate([np.asarray(jax.nn.relu(m.fc1(a)), np.float64) for a in xs])
    for k, rows in (("fc1/kernel", x), ("fc2/kernel", h)):
        np.testing.assert_allclose(np.asarray(st[k].gram), rows.T @ rows, rtol=1e-5, atol=1e-5)
        assert st[k].count == rows.shape[0]
    new, masks = oneshot.prune_layers(nnx.state(m, nnx.Param), st, "sparsegpt", 0.5)
    nnx.update(m, new)
    for _path, mk in leaves_with_paths(masks):
        if mk is not None:
            assert (~np.asarray(mk)).mean() == 0.5
    k = np.asarray(m.fc1.kernel[...])
    assert (k[~np.asarray(masks["fc1"]["kernel"])] == 0).all()


class _Blk(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.fc(x)))


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([_Blk(rngs) for _ in range(2)])


def test_prune_sequential_nnx_param_state_in_train_mode():
    # old code: flax TraceContextError (the block's BatchStat Variables, held concretely, were
    # mutated inside the calibration trace); oracle: the same run on the full nnx.state
    xs = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(2)]
    out = {}
    for which in ("param", "full"):
        net = _Net(nnx.Rngs(0))  # nnx modules start in train mode
        st = nnx.state(net, nnx.Param) if which == "param" else nnx.state(net)
        blocks = [oneshot.BlockSpec(f"blocks/{i}", net.blocks[i]) for i in range(2)]
        new, masks = oneshot.prune_sequential(st, blocks, xs, "sparsegpt", 0.5, progress=False)
        nnx.update(net, new)
        out[which] = {p: np.asarray(m) for p, m in leaves_with_paths(masks) if m is not None}
        for i in range(2):
            k = np.asarray(net.blocks[i].fc.kernel[...])
            assert (k == 0).mean() == 0.5
    assert set(out["param"]) == {"blocks/0/fc/kernel", "blocks/1/fc/kernel"}
    for p in out["param"]:
        np.testing.assert_array_equal(out["param"][p], out["full"][p])


def test_checkpoints_refuse_live_nnx_objects(tmp_path):
    # old code: a Module was saved (paths 'kernel/value') and could never be restored
    m = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param)
    with CheckpointManager(str(tmp_path / "ck"), async_save=False) as mgr:
        with pytest.raises(TypeError, match=r"nnx Linear object, not its state; pass nnx.state"):
            mgr.save(1, m)
        with pytest.raises(TypeError, match=r"nnx Optimizer object at \['opt'\]"):
            mgr.save(1, {"model": nnx.state(m), "opt": opt})
        assert mgr.all_steps() == []
        mgr.save(1, {"model": nnx.state(m)})
        with pytest.raises(TypeError, match="template got an nnx Linear object"):
            mgr.restore({"model": nnx.Linear(3, 4, rngs=nnx.Rngs(1))})
        fresh = nnx.Linear(3, 4, rngs=nnx.Rngs(1))
        state, _ = mgr.restore({"model": nnx.state(fresh)})
        nnx.update(fresh, state["model"])
        np.testing.assert_array_equal(fresh.kernel[...], m.kernel[...])
    masks = {"bias": None, "kernel": jnp.ones((3, 4), bool)}
    with pytest.raises(TypeError, match="save_sparse got an nnx Linear object"):
        compact.save_sparse(str(tmp_path / "c"), m, masks)


def test_get_masks_names_the_nnx_mistake():
    m = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    tx = jp.pruner(optax.sgd(0.1), schedule=jp.schedules.OneShot(0.5, step=0))
    opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
    assert jp.get_masks(opt.opt_state)["kernel"].shape == (8, 4)
    assert jp.get_masks(opt)["kernel"].shape == (8, 4)
    with pytest.raises(ValueError, match="got an nnx Linear: pass the nnx.Optimizer"):
        jp.get_masks(m)
    with pytest.raises(ValueError, match="got an nnx.State, which does not keep the optax"):
        jp.get_masks(nnx.state(opt))
