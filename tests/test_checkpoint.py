"""Checkpoints: exact resume, kill-during-save, structure mismatch, errors, compact checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jaxprune as jp
from jaxprune.core.masks import leaves_with_paths
from jaxprune.io import checkpoint as ck
from jaxprune.io import compact as sc
from jaxprune.kernels import formats as F
from jaxprune.zoo.loops import cross_entropy
from jaxprune.zoo.models import MLP

REPO = Path(__file__).resolve().parents[1]

_X = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
_Y = (np.abs(_X[:, :4]).argmax(1)).astype(np.int32)


def batch_at(i: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(1000 + i).integers(0, len(_X), 16)
    return _X[idx], _Y[idx]


def setup(hidden: int = 32, inner: optax.GradientTransformation | None = None):
    model = MLP(features=(hidden, hidden, 4))
    tx = jp.pruner(inner or optax.adam(1e-2),
                   schedule=jp.Polynomial(0.8, begin=0, end=8, freq=2))
    params = model.init(jax.random.key(0), _X[:1])["params"]
    state = ck.TrainState.create(params, tx.init(params), seed=7)

    @jax.jit
    def train_step(state: ck.TrainState, x, y) -> ck.TrainState:
        rng, sub = jax.random.split(state.rng)
        x = x + 0.01 * jax.random.normal(sub, x.shape)  # uses the rng: it must resume too

        def loss_fn(p):
            return cross_entropy(model.apply({"params": p}, x), y)

        grads = jax.grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return ck.TrainState(state.step + 1, optax.apply_updates(state.params, updates),
                             opt_state, rng, state.data_pos + 1)

    return state, train_step


def run(state, train_step, n, mgr=None):
    it = ck.IndexedIterator(batch_at, int(state.data_pos))
    for _ in range(n):
        state = train_step(state, *next(it))
        if mgr is not None:
            mgr.save(int(state.step), state, config={"hidden": 32})
    return state


def assert_trees_equal(a, b):
    la, lb = leaves_with_paths(a), leaves_with_paths(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb, strict=True):
        if x is None or y is None:
            assert x is None and y is None, p
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=p)


def test_exact_resume_bit_identical(tmp_path):
    state0, step = setup()
    full = run(state0, step, 12)

    with ck.CheckpointManager(tmp_path / "ckpt", max_to_keep=2) as mgr:  # async saves
        run(state0, step, 5, mgr)
    # "new process": fresh template, restore latest, continue
    template, step2 = setup()
    with ck.CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.all_steps() == [4, 5]  # retention
        restored, cfg = mgr.restore(template)
    assert cfg == {"hidden": 32}
    assert int(restored.step) == 5 and int(restored.data_pos) == 5
    masks = jp.get_masks(restored.opt_state)
    assert masks["Dense_0"]["bias"] is None  # None mask leaves round-trip
    assert masks["Dense_0"]["kernel"].dtype == jnp.bool_
    resumed = run(restored, step2, 7)
    assert_trees_equal(full, resumed)  # params, masks, counters, moments, rng, data position
    assert jp.total_sparsity(resumed.params, jp.get_masks(resumed.opt_state)) == pytest.approx(
        0.8, abs=0.01)


def test_mismatch_names_first_path(tmp_path):
    state, _ = setup(hidden=32)
    with ck.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, state)
        other, _ = setup(hidden=16)
        with pytest.raises(ck.CheckpointMismatchError, match="'params/Dense_0/bias'.*shape"):
            mgr.restore(other)
        sgd, _ = setup(inner=optax.sgd(0.1))
        msg = "opt_state/inner_state/0/count.*in the checkpoint but not"
        with pytest.raises(ck.CheckpointMismatchError, match=msg):
            mgr.restore(sgd)
        # a different model family entirely
        with pytest.raises(ck.CheckpointMismatchError, match="not in the checkpoint"):
            mgr.restore({"encoder": {"kernel": jnp.zeros((3, 3))}})


def test_nnx_state_round_trip_into_nnx_template(tmp_path):
    """An ``nnx.State`` (params, masks, an RNG key) saved as is restores into a fresh model's
    ``nnx.State``: stored as its pure dict, rebuilt as the template's Variables."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(6, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 2, rngs=rngs)
            self.rngs = rngs

    net = Net(nnx.Rngs(0))
    params = nnx.state(net, nnx.Param)
    masks = jp.prune(params, 0.5)[1]
    rng_state = nnx.state(net, nnx.RngState)
    state = {"params": params, "masks": masks, "rngs": rng_state, "step": jnp.int32(7)}
    with ck.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(7, state)
        fresh = Net(nnx.Rngs(1))
        template = {"params": nnx.state(fresh, nnx.Param), "masks": masks,
                    "rngs": nnx.state(fresh, nnx.RngState), "step": jnp.int32(0)}
        out, _ = mgr.restore(template)
        assert isinstance(out["params"], nnx.State) and int(out["step"]) == 7
        nnx.update(fresh, out["params"], out["rngs"])
        np.testing.assert_array_equal(fresh.l1.kernel[...], net.l1.kernel[...])
        np.testing.assert_array_equal(jax.random.key_data(fresh.rngs.default.key[...]),
                                      jax.random.key_data(net.rngs.default.key[...]))
        assert_trees_equal(out["masks"], masks)
        # a model of another width is named, not silently restored
        other = {"params": nnx.state(nnx.Linear(6, 3, rngs=nnx.Rngs(0)), nnx.Param)}
        with pytest.raises(ck.CheckpointMismatchError, match="not in the"):
            mgr.restore({**template, **other})


def test_missing_step_and_empty_dir(tmp_path):
    with ck.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ck.CheckpointError, match="no checkpoint in"):
            mgr.restore({"w": jnp.ones(2)})
        mgr.save(3, {"w": jnp.ones(2)}, wait=True)
        with pytest.raises(ck.CheckpointError, match="step 4.*have \\[3\\]"):
            mgr.restore({"w": jnp.ones(2)}, step=4)


def test_force_overwrites_existing_step(tmp_path):
    with ck.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, {"w": jnp.ones(2)})
        mgr.save(1, {"w": jnp.full(2, 5.0)}, force=True)
        out, _ = mgr.restore({"w": jnp.zeros(2)})
    np.testing.assert_array_equal(out["w"], [5.0, 5.0])


def test_dropped_saves_raise_or_warn_and_steps_are_validated(tmp_path):
    w = {"w": jnp.ones(2)}
    with ck.CheckpointManager(tmp_path / "a", async_save=False) as mgr:
        mgr.save(3, w)
        with pytest.raises(ck.CheckpointError, match="step 3 already exists.*force=True"):
            mgr.save(3, w)
        with pytest.raises(ck.CheckpointError, match="step 2 is older than the latest step 3"):
            mgr.save(2, w)
        for bad, err in [(-1, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)]:
            with pytest.raises(err, match="step must be an integer >= 0"):
                mgr.save(bad, w)
        assert mgr.save(np.int64(4), w) and mgr.all_steps() == [3, 4]
        # resumed from 3 to train another continuation: discard the newer steps explicitly
        assert mgr.delete_steps_after(3) == [4] and mgr.all_steps() == [3]
    with ck.CheckpointManager(tmp_path / "a", async_save=False, on_drop="warn") as mgr:
        with pytest.warns(UserWarning, match="step 3 already exists"):
            assert mgr.save(3, {"w": jnp.zeros(2)}) is False
        np.testing.assert_array_equal(mgr.restore(w)[0]["w"], np.ones(2))
    with pytest.raises(ValueError, match="on_drop must be 'raise' or 'warn'"):
        ck.CheckpointManager(tmp_path / "b", on_drop="ignore")
    with pytest.raises(ValueError, match="save_interval_steps must be an integer >= 1"):
        ck.CheckpointManager(tmp_path / "b", save_interval_steps=0)


def test_bit_rot_is_detected_naming_the_array(tmp_path):
    big = np.random.default_rng(0).normal(size=4096).astype(np.float32)
    state = {"a": jnp.arange(64.0), "b": {"big": jnp.asarray(big)}}
    with ck.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, state)
        # flip one byte in the middle of the largest file: the arrays' (compressed) bytes; the
        # small b-tree index files are protected by tensorstore's own CRC
        f = max((p for p in (tmp_path / "1" / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x5A
        f.write_bytes(bytes(b))
        with pytest.raises(ck.IntegrityError, match="'b/big' is corrupted.*step 1"):
            mgr.restore(state)
        # a direct oracle: checksums of the saved tree equal zlib's crc32 of the bytes
        import zlib
        sums = ck.integrity.checksums(state)
        assert sums["b/big"] == zlib.crc32(big.tobytes())
        with pytest.raises(ck.IntegrityError, match="'b/big' is corrupted"):
            ck.integrity.verify_checksums({"a": state["a"], "b": {"big": state["b"]["big"] + 1}},
                                          sums)


@pytest.mark.parametrize("name,what", [("_CHECKPOINT_METADATA", "the step's metadata"),
                                       ("state/_METADATA", "the state's tree"),
                                       ("config/metadata", "the config")])
def test_deleted_metadata_is_reported_as_damage(tmp_path, name, what):
    with ck.CheckpointManager(tmp_path, async_save=False) as mgr:
        mgr.save(1, {"w": jnp.ones(2)})
    (tmp_path / "1" / name).unlink()
    with ck.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ck.CheckpointError, match=f"step 1 .* is damaged: {name} \\({what}"):
            mgr.restore({"w": jnp.zeros(2)})


def test_replacing_save_recovers_from_a_crash_at_every_stage(tmp_path, monkeypatch):
    """In-process version of tests/test_faults.py: the swap fails at each stage."""
    for stage in ("staged", "old_moved_aside", "new_in_place", "old_deleted"):
        d = tmp_path / stage
        with ck.CheckpointManager(d, async_save=False) as mgr:
            mgr.save(1, {"w": jnp.ones(2)})

            def boom(name, stage=stage):
                if name == stage:
                    raise OSError(f"injected at {name}")

            monkeypatch.setattr(ck.integrity, "FAULT_HOOK", boom)
            with pytest.raises(ck.CheckpointError, match=f"replacing step 1.*injected at {stage}"):
                mgr.save(1, {"w": jnp.full(2, 2.0)}, force=True)
            monkeypatch.setattr(ck.integrity, "FAULT_HOOK", None)
            out = mgr.restore({"w": jnp.zeros(2)})[0]["w"]
            # before the new data is in place the old step is kept, afterwards the new one
            want = 1.0 if stage in ("staged", "old_moved_aside") else 2.0
            np.testing.assert_array_equal(out, np.full(2, want))
            assert sorted(os.listdir(d)) == ["1"]


def test_unwritable_directory_errors(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ck.CheckpointError, match="cannot create checkpoint directory"):
        ck.CheckpointManager(f / "ckpt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_directory_restores_but_refuses_saves(tmp_path):
    d = tmp_path / "ro"
    with ck.CheckpointManager(d, async_save=False) as mgr:
        mgr.save(1, {"w": jnp.arange(3.0)})
    d.chmod(0o555)
    try:
        with ck.CheckpointManager(d) as mgr:
            np.testing.assert_array_equal(mgr.restore({"w": jnp.zeros(3)})[0]["w"], np.arange(3.0))
            with pytest.raises(ck.CheckpointError, match="read-only.*restoring only"):
                mgr.save(2, {"w": jnp.zeros(3)})
    finally:
        d.chmod(0o755)


def test_read_only_filesystem_restores_but_refuses_saves(tmp_path, monkeypatch):
    """The chmod test above cannot run as root (CI): a read-only mount (EROFS) is simulated. (A
    real ``mount --bind -o ro`` was checked by hand: same messages.)"""
    import builtins
    import errno

    d = tmp_path / "ro"
    with ck.CheckpointManager(d, async_save=False) as mgr:
        mgr.save(1, {"w": jnp.arange(3.0)})

    def ro_open(path, *a, **k):
        if ".jaxprune-write-probe-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, *a, **k)

    monkeypatch.setattr(ck, "open", ro_open, raising=False)
    with ck.CheckpointManager(d) as mgr:
        assert mgr.read_only is not None and "is read-only" in mgr.read_only
        np.testing.assert_array_equal(mgr.restore({"w": jnp.zeros(3)})[0]["w"], np.arange(3.0))
        with pytest.raises(ck.CheckpointError, match="is read-only.*open for restoring only"):
            mgr.save(2, {"w": jnp.zeros(3)})
        with pytest.raises(ck.CheckpointError, match="read-only"):
            mgr.delete_steps_after(0)
    assert sorted(os.listdir(d)) == ["1"]


def test_full_directory_refuses_to_save(tmp_path, monkeypatch):
    with ck.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"w": jnp.ones(1000)}, wait=True)
        monkeypatch.setattr(ck, "_free_bytes", lambda path: 100)
        with pytest.raises(ck.CheckpointError, match="is full"):
            mgr.save(2, {"w": jnp.ones(1000)})
        assert mgr.latest_step() == 1


def test_failed_async_save_is_not_silent(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    async def boom(self):
        raise OSError(28, "No space left on device")

    mgr = ck.CheckpointManager(tmp_path)
    mgr.save(1, {"w": jnp.ones(4)}, wait=True)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", boom)
    with pytest.raises(ck.CheckpointError, match="No space left"):
        mgr.save(2, {"w": jnp.ones(4)})
        mgr.wait()
    monkeypatch.undo()
    assert mgr.latest_step() == 1
    out, _ = mgr.restore({"w": jnp.zeros(4)})
    np.testing.assert_array_equal(out["w"], np.ones(4))


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, pathlib
    import jax, jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from jaxprune.io import checkpoint as ck
    d, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    mgr = ck.CheckpointManager(d)
    mgr.save(1, {"w": jnp.arange(4096.0)}, wait=True)

    async def hang(self):  # data is written to <step>.orbax-checkpoint-tmp; hang before rename
        marker.write_text(str(self.get()))
        time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = hang
    mgr.save(2, {"w": -jnp.arange(4096.0)})
    time.sleep(600)
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    d, marker = tmp_path / "ckpt", tmp_path / "marker"
    script = tmp_path / "saver.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(script), str(d), str(marker)], env=env)
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert proc.poll() is None, "saver exited early"
            assert time.monotonic() - t0 < 120, "saver never reached the save"
            time.sleep(0.05)
        tmp_dir = Path(marker.read_text())
        assert tmp_dir.exists() and ck.TMP_SUFFIX in tmp_dir.name
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(os.listdir(d))[0] == "1"
    assert any(ck.TMP_SUFFIX in n for n in os.listdir(d))  # the half-written step 2
    with ck.CheckpointManager(d) as mgr:
        assert mgr.all_steps() == [1]
        out, _ = mgr.restore({"w": jnp.zeros(4096)})
        np.testing.assert_array_equal(out["w"], np.arange(4096.0))
        mgr.save(2, {"w": jnp.ones(4096)}, wait=True)  # the step can be written again
        assert mgr.all_steps() == [1, 2]


# ----------------------------------------------------------------------------------------------
# compact sparse checkpoints
# ----------------------------------------------------------------------------------------------


def _params(rng, shapes):
    return {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=s).astype(np.float32)),
                      "bias": jnp.asarray(rng.normal(size=s[-1:]).astype(np.float32))}
            for i, s in enumerate(shapes)}


@pytest.mark.parametrize("pattern,sparsity,max_ratio,fmt", [
    ("unstructured", 0.9, 0.2, F.Bitmask),
    ("2:4", 0.5, 0.55, F.NMPacked),
    ("block4x4", 0.9, 0.2, F.BlockSparse),
])
def test_compact_roundtrip_and_size(tmp_path, pattern, sparsity, max_ratio, fmt):
    params = _params(np.random.default_rng(0), [(128, 128), (128, 64)])
    pruned, masks = jp.prune(params, sparsity, pattern=pattern)
    info = sc.save_sparse(tmp_path / "sparse", pruned, masks, pattern=pattern)
    with ck.CheckpointManager(tmp_path / "dense", async_save=False) as mgr:
        mgr.save(0, {"params": pruned, "masks": masks})
    dense_bytes = ck.dir_size(tmp_path / "dense" / "0")
    assert info["bytes"] == ck.dir_size(tmp_path / "sparse")
    # vs the raw dense arrays (f32 params + bool masks), and vs orbax's own (zstd-compressed)
    # dense checkpoint, which already squeezes the zeros
    assert info["ratio"] < max_ratio, info
    assert info["bytes"] < dense_bytes, (info, dense_bytes)
    p2, m2 = sc.load_sparse(tmp_path / "sparse", template=params)
    assert_trees_equal(pruned, p2)
    assert_trees_equal(masks, m2)
    # the stored leaves are the one packer's formats, lossless
    packed = sc.load_packed(tmp_path / "sparse", template=params)
    assert isinstance(packed["l0"]["kernel"], fmt)
    assert isinstance(packed["l0"]["bias"], jax.Array)
    np.testing.assert_array_equal(np.asarray(F.unpack(packed["l0"]["kernel"])),
                                  np.asarray(pruned["l0"]["kernel"]))


def _roundtrip(tmp_path, params, masks, pattern, name="s"):
    sc.save_sparse(tmp_path / name, params, masks, pattern=pattern)
    p2, m2 = sc.load_sparse(tmp_path / name, template=params)
    assert_trees_equal(params, p2)
    assert_trees_equal(masks, m2)
    return sc.load_packed(tmp_path / name)


def test_compact_keeps_masked_zero_values_and_nm_underfull_groups(tmp_path):
    # a kept weight that is exactly 0.0 must stay "kept"; an N:M group with < n kept round-trips
    w = np.arange(1.0, 17.0, dtype=np.float32).reshape(8, 2)
    m = np.ones((8, 2), bool)
    m[0::4] = False
    m[1::4] = False  # 2:4 along axis 0
    m[2, 0] = False  # group with only one kept entry
    w[3, 1] = 0.0    # kept zero
    params = {"d": {"kernel": jnp.asarray(w * m), "bias": jnp.ones(2)}}
    masks = {"d": {"kernel": jnp.asarray(m), "bias": None}}
    for pat in ("unstructured", "2:4"):
        _roundtrip(tmp_path, params, masks, pat, name=pat.replace(":", "_"))


def _nm_params(rng, k, cols, n, m, *, empty_groups=False):
    """(k, cols) kernel with an N:M mask along axis 0: random counts in [0, n] per group."""
    mask = np.zeros((k // m, m, cols), bool)
    for g in range(k // m):
        for c in range(cols):
            cnt = 0 if empty_groups and (g + c) % 2 == 1 else rng.integers(1, n + 1)
            pos = rng.choice(m, size=cnt, replace=False)
            mask[g, np.arange(m - cnt, m) if g == c == 0 else pos, c] = True
    mask = mask.reshape(k, cols)
    w = np.where(mask, rng.normal(size=(k, cols)) + 3.0, 0.0).astype(np.float32)
    return {"kernel": jnp.asarray(w)}, {"kernel": jnp.asarray(mask)}


@pytest.mark.parametrize("n,m,word", [(2, 256, np.uint8), (3, 256, np.uint8), (1, 512, np.uint16),
                                      (5, 512, np.uint16)])
def test_compact_nm_large_m_lossless(tmp_path, n, m, word):
    """Positions >= 255 and under-full groups of m >= 256 land where they were (uint8 wrapped)."""
    params, masks = _nm_params(np.random.default_rng(m + n), 2 * m, 3, n, m, empty_groups=m > 256)
    assert bool(masks["kernel"][m - 1, 0])  # the last position of a group is used
    packed = _roundtrip(tmp_path, params, masks, f"{n}:{m}")
    assert isinstance(packed["kernel"], F.NMPacked)
    assert packed["kernel"].indices.dtype == word


def test_compact_nm_last_position_of_256():
    """Regression oracle: a value kept at position 255 of a 1:256 group keeps its position."""
    w = np.zeros((256, 1), np.float32)
    w[255, 0] = 7.0
    p = F.pack_nm(w, w != 0, 1, 256)
    np.testing.assert_array_equal(np.asarray(F.unpack(p)), w)


def test_compact_bitmask_fallbacks(tmp_path):
    rng = np.random.default_rng(0)
    # 1:256 with empty groups: NMPacked would decode an empty group as one kept zero
    params, masks = _nm_params(rng, 512, 2, 1, 256, empty_groups=True)
    assert isinstance(_roundtrip(tmp_path, params, masks, "1:256", "a")["kernel"], F.Bitmask)
    # N:M along a non-contraction axis, and a 1-d leaf
    w = jnp.asarray(rng.normal(size=(8, 4, 3)).astype(np.float32))
    pat = jp.NM(2, 4, axis=0)
    m3 = pat.mask(jnp.abs(w), 0.5)
    v = jnp.arange(1.0, 9.0)
    m1 = jp.NM(2, 4).mask(v, 0.5)
    params = {"w": jnp.where(m3, w, 0), "v": jnp.where(m1, v, 0)}
    masks = {"w": m3, "v": m1}
    rules = jp.PerLeaf(rules=(("^w$", pat),), default=jp.NM(2, 4))
    packed = _roundtrip(tmp_path, params, masks, rules, "b")
    assert isinstance(packed["w"], F.Bitmask) and isinstance(packed["v"], F.Bitmask)
    with pytest.raises(ValueError, match="'w'.*not 2:4 along axis 0"):
        sc.save_sparse(tmp_path / "c", params, {"w": jnp.ones_like(m3), "v": m1}, pattern=rules)


def test_compact_all_pruned_leaf(tmp_path):
    params = {"a": jnp.zeros((8, 4)), "b": jnp.zeros((8, 4))}
    masks = {"a": jnp.zeros((8, 4), bool), "b": jnp.zeros((8, 4), bool)}
    _roundtrip(tmp_path, params, masks, jp.PerLeaf(rules=(("a", "block4x4"),)))


def test_compact_rejects_wrong_pattern_naming_path(tmp_path):
    params = {"d": {"kernel": jnp.ones((8, 4))}}
    masks = {"d": {"kernel": jnp.ones((8, 4), bool)}}
    with pytest.raises(ValueError, match="'d/kernel'.*2:4"):
        sc.save_sparse(tmp_path / "a", params, masks, pattern="2:4")
    eye = jnp.eye(8, 4, dtype=bool)
    with pytest.raises(ValueError, match="'d/kernel'.*block"):
        sc.save_sparse(tmp_path / "b", {"d": {"kernel": eye * 1.0}}, {"d": {"kernel": eye}},
                       pattern="block4x4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compact_refuses_values_where_mask_is_off(tmp_path):
    """STE keeps dense weights: a compact checkpoint must not drop them silently."""
    w = jnp.arange(1.0, 33.0).reshape(8, 4)
    m = jnp.zeros((8, 4), bool).at[:2].set(True)
    params = {"d": {"kernel": w.at[7, 3].set(0.0)}, "e": {"kernel": w * m}}
    masks = {"d": {"kernel": m}, "e": {"kernel": m}}
    with pytest.raises(ValueError, match=r"'d/kernel'.*23 of its 24 masked-off entries"):
        sc.save_sparse(tmp_path / "s", params, masks)
    assert not (tmp_path / "s").exists()
    sc.save_sparse(tmp_path / "s", jp.apply_masks(params, masks), masks)
    with pytest.warns(UserWarning, match="dropped 23 nonzero values"):  # opt-in: zeroed, reported
        info = sc.save_sparse(tmp_path / "t", params, masks, drop_off_mask=True)
    assert info["dropped"] == {"d/kernel": 23}
    p2, m2 = sc.load_sparse(tmp_path / "t")
    np.testing.assert_array_equal(p2["d"]["kernel"], np.asarray(params["d"]["kernel"] * m))
    with pytest.raises(TypeError, match="drop_off_mask must be True or False"):
        sc.save_sparse(tmp_path / "u", params, masks, drop_off_mask="yes")


def test_compact_missing_or_foreign_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete sparse checkpoint"):
        sc.load_sparse(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete sparse checkpoint"):
        sc.load_sparse(tmp_path / "other")


def test_compact_template_mismatch(tmp_path):
    params = _params(np.random.default_rng(0), [(16, 8)])
    pruned, masks = jp.prune(params, 0.5)
    sc.save_sparse(tmp_path / "s", pruned, masks)
    with pytest.raises(ck.CheckpointMismatchError, match="'l0/bias'.*shape"):
        sc.load_sparse(tmp_path / "s", template=_params(np.random.default_rng(0), [(16, 4)]))


def test_sparse_pretrain_stop_and_resume(tmp_path):
    """The experiment resumes with one flag (bit-exactness itself is tested above)."""
    from jaxprune_experiments import sparse_pretrain as exp

    flags = ["--quick", "--steps", "6", "--batch", "4", "--seq", "16", "--d-model", "16",
             "--layers", "1", "--heads", "2", "--prune-every", "2", "--ckpt-every", "3",
             "--log-every", "3", "--corpus-bytes", "100000", "--mesh", "1,2",
             "--ckpt-dir", str(tmp_path)]
    assert exp.main([*flags, "--stop-after", "3"]) == 0
    assert exp.main(flags) == 2  # refuses to clobber an existing run without --resume
    assert exp.main([*flags, "--resume"]) == 0
    with ck.CheckpointManager(tmp_path) as mgr:
        assert mgr.latest_step() == 6
        st = mgr._mgr.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert int(st["state"]["data_pos"]) == 6


@pytest.mark.parametrize("bits,sym", [(4, True), (8, False)])
def test_compact_nm_quant_packed_saved_as_is(tmp_path, bits, sym):
    """An NMQuantPacked leaf (2:4 + int codes + group scales; None zeros when symmetric) is stored
    as it is: every array bit-exact after load_packed, and load_sparse gives its dequantized
    weight and its mask."""
    from jaxprune.kernels import quant_formats as QF

    rng = np.random.default_rng(bits)
    k, n_out, g = 64, 6, 32
    params, masks = _nm_params(rng, k, n_out, 2, 4)
    mask = np.asarray(masks["kernel"])
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    codes = np.where(mask, rng.integers(lo, hi + 1, size=(k, n_out)), 0)
    codes = codes.astype(np.int8 if sym else np.uint8)
    scales = rng.uniform(0.01, 1.0, size=(k // g, n_out)).astype(np.float32)
    zeros = None if sym else rng.integers(0, 2**bits, size=(k // g, n_out)).astype(np.uint8)
    if not sym:  # pruned entries hold the code of value 0: the zero point
        codes = np.where(mask, codes, np.repeat(zeros, g, axis=0)).astype(np.uint8)
    p = QF.pack_nm_quant(codes, mask, scales, zeros, bits=bits, group_size=g)
    tree = {"q": {"kernel": p, "bias": jnp.ones(n_out)}, "d": params}
    mtree = {"q": {"kernel": None, "bias": None}, "d": masks}
    info = sc.save_sparse(tmp_path / "s", tree, mtree, pattern="2:4")
    assert info["bytes"] > 0
    back = sc.load_packed(tmp_path / "s")
    q = back["q"]["kernel"]
    assert isinstance(q, QF.NMQuantPacked) and (q.zeros is None) == sym
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (q.shape, q.n, q.m, q.bits, q.group_size) == (p.shape, p.n, p.m, p.bits, p.group_size)
    c2, m2, s2, _ = QF.unpack_nm_quant(q)
    np.testing.assert_array_equal(np.asarray(c2), codes)
    np.testing.assert_array_equal(np.asarray(m2), mask)
    w, m = sc.load_sparse(tmp_path / "s")
    zr = 0.0 if sym else np.repeat(zeros, g, axis=0).astype(np.float64)
    ref = np.where(mask, (codes.astype(np.float64) - zr) * np.repeat(scales, g, axis=0), 0.0)
    np.testing.assert_allclose(np.asarray(w["q"]["kernel"]), ref, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(m["q"]["kernel"]), mask)
    np.testing.assert_array_equal(np.asarray(w["d"]["kernel"]), np.asarray(params["kernel"]))
    # a mask that disagrees with the packed leaf's own is refused, naming the leaf
    bad = {"q": {"kernel": jnp.asarray(~mask), "bias": None}, "d": masks}
    with pytest.raises(ValueError, match="q/kernel"):
        sc.save_sparse(tmp_path / "bad", tree, bad, pattern="2:4")


def test_compact_checkpoint_zero_size_and_odd_leaves(tmp_path):
    """Zero-size leaves (orbax cannot store them) round-trip by shape and dtype, masked or not,
    next to bf16/fp16 kernels, a scalar, an int leaf, lists and tuples."""
    k = jax.random.split(jax.random.key(0), 3)
    params = {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 4, 8), jnp.bfloat16)},
              "dense": {"kernel": jax.random.normal(k[1], (16, 8), jnp.float16)},
              "lst": [jax.random.normal(k[2], (8, 4)), jnp.arange(3)], "scalar": jnp.float32(3.0),
              "empty": jnp.zeros((0, 4), jnp.bfloat16), "tup": (jnp.zeros((2, 0)),)}
    weights = lambda p, x: x.ndim >= 2 and x.size > 0 and x.dtype != jnp.int32  # noqa: E731
    for i, pat in enumerate(["unstructured", "2:4"]):
        pruned, masks = jp.prune(params, 0.5, pattern=pat, filter=weights)
        masks["tup"] = (jnp.zeros((2, 0), bool),)  # a mask on an empty leaf is kept too
        sc.save_sparse(tmp_path / f"c{i}", pruned, masks, pattern=pat)
        p2, m2 = sc.load_sparse(tmp_path / f"c{i}", template=params)
        for (path, a), (_, b) in zip(leaves_with_paths(pruned), leaves_with_paths(p2), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype and bool(jnp.array_equal(a, b)), path
        for (path, a), (_, b) in zip(leaves_with_paths(masks), leaves_with_paths(m2), strict=True):
            assert (a is None) == (b is None) and (a is None or bool(jnp.array_equal(a, b))), path


def test_dense_checkpoint_zero_size_leaves(tmp_path):
    """orbax cannot store a zero-size array: such leaves (and their adam moments) are saved as
    nothing and restored from the template, with and without shardings."""
    params = {"w": jnp.arange(16.).reshape(4, 4), "empty": jnp.zeros((0, 4), jnp.bfloat16)}
    state = ck.TrainState.create(params, optax.adam(1e-3).init(params))
    with ck.CheckpointManager(tmp_path, async_save=False) as mgr:
        assert mgr.save(3, state)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        for kw in ({}, {"shardings": jax.tree.map(lambda _: dev, state)}):
            got, _ = mgr.restore(state, **kw)
            for (path, a), (_, b) in zip(leaves_with_paths(state), leaves_with_paths(got),
                                         strict=True):
                assert a.shape == b.shape and a.dtype == b.dtype, path
            np.testing.assert_array_equal(got.params["w"], params["w"])
