"""Regression tests for I/O and kernel bugs found by an outside review (each compares to an oracle).

* checkpoints: leaves whose path strings collide restored with a false ``IntegrityError``; Python
  and NumPy scalar leaves saved but never restored; a process killed while retention deleted an
  old step left a half-deleted step that ``all_steps()`` listed; SIGKILL at random moments.
* compact checkpoints: colliding paths restored each other's values silently; a tree with only
  zero-size (or no) leaves failed with orbax's "Found empty item."; a kept ``-0.0`` in an N:M leaf
  came back as ``+0.0``.
* kernels: the N:M backward gave the padding slot of a group with fewer than ``n`` kept entries
  (``m == 2**bits``: the padding repeats a kept slot's code) the kept weight's gradient, so a
  training step moved that weight twice; float / 3-element ``block`` and bad ``tm``/``tiles`` were
  truncated or failed obscurely.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxprune.io import compact, integrity
from jaxprune.io import sharding as shd
from jaxprune.io.checkpoint import CheckpointError, CheckpointManager
from jaxprune.kernels import block_sparse_matmul, nm_matmul
from jaxprune.kernels import formats as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def test_colliding_paths_restore_exactly(tmp_path):
    tree = {"a/b": jnp.ones(3), "a": {"b": jnp.arange(3.0)}}
    assert len(integrity.checksums(tree)) == 2  # one checksum per leaf, none overwritten
    with CheckpointManager(tmp_path, async_save=False) as m:
        m.save(0, tree)
        out, _ = m.restore(jax.tree.map(jnp.zeros_like, tree))
    assert _same_bits(out["a/b"], tree["a/b"]) and _same_bits(out["a"]["b"], tree["a"]["b"])
    # corruption of a colliding leaf is still detected
    bad = {"a/b": jnp.ones(3), "a": {"b": jnp.zeros(3)}}
    with pytest.raises(integrity.IntegrityError, match=r"\['a'\]\['b'\]"):
        integrity.verify_checksums(bad, integrity.checksums(tree))


def test_python_and_numpy_scalars_round_trip(tmp_path):
    tree = {"i": 7, "f": 0.1 + 0.2, "b": True, "np32": np.float32(2.5), "npi": np.int64(2**40),
            "w": jnp.ones(2)}
    template = {"i": 0, "f": 0.0, "b": False, "np32": np.float32(0), "npi": np.int64(0),
                "w": jnp.zeros(2)}
    with CheckpointManager(tmp_path, async_save=False) as m:
        m.save(0, tree)
        out, _ = m.restore(template)
    for k in ("i", "f", "b"):
        assert type(out[k]) is type(tree[k]) and out[k] == tree[k], k
    for k in ("np32", "npi"):
        assert isinstance(out[k], np.generic) and _same_bits(out[k], tree[k]), k


_WRITER = textwrap.dedent("""
    import os, shutil, signal, sys
    import jax.numpy as jnp
    from jaxprune.io.checkpoint import CheckpointManager
    d, mode = sys.argv[1], sys.argv[2]
    state = lambda s: {"w": jnp.full((32, 32), s, jnp.float32), "m": {"k": jnp.full(8, s % 2 == 0),
                       "n": None}, "s": jnp.int32(s)}
    if mode == "kill_in_delete":  # die halfway through deleting anything inside the directory
        real = shutil.rmtree
        def rmtree(path, *a, **k):
            path = os.fspath(path)
            if path.startswith(d) and os.path.isdir(path):
                for root, _, files in os.walk(path):
                    for f in files:
                        os.remove(os.path.join(root, f))
                        os.kill(os.getpid(), signal.SIGKILL)
            return real(path, *a, **k)
        shutil.rmtree = rmtree
    mgr = CheckpointManager(d, max_to_keep=1, async_save=mode == "async")
    start = (mgr.latest_step() or 0) + 1
    print("ready", flush=True)
    for s in range(start, start + 1000):
        mgr.save(s, state(s), config={"s": s})
""")


def _check_all_steps(d) -> list[int]:
    """Every listed step restores to exactly what was saved as that step."""
    template = {"w": jnp.zeros((32, 32)), "m": {"k": jnp.zeros(8, bool), "n": None},
                "s": jnp.int32(0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = CheckpointManager(d, async_save=False)
    steps = mgr.all_steps()
    for s in steps:
        out, cfg = mgr.restore(template, s)
        assert cfg["s"] == s and int(out["s"]) == s
        assert np.all(np.asarray(out["w"]) == s) and out["m"]["n"] is None
        assert np.all(np.asarray(out["m"]["k"]) == (s % 2 == 0))
    mgr.close()
    return steps


def _writer(tmp_path, d, mode):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(script), str(d), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)


def test_killed_while_retention_deletes_leaves_no_half_deleted_step(tmp_path):
    d = tmp_path / "ckpt"
    p = _writer(tmp_path, d, "kill_in_delete")
    assert p.wait(timeout=120) == -signal.SIGKILL
    steps = _check_all_steps(d)  # before the fix: step 1, half deleted, was listed and damaged
    assert steps and not os.path.exists(d / integrity.DELETED_SUBDIR)


def test_sigkill_at_random_moments_leaves_restorable_steps(tmp_path):
    d = tmp_path / "ckpt"
    rnd = random.Random(0)
    for mode in ("sync", "async", "sync"):
        p = _writer(tmp_path, d, mode)
        p.stdout.readline()
        time.sleep(rnd.uniform(0.05, 1.0))
        p.kill()
        p.wait()
        p.stdout.close()
        _check_all_steps(d)


def test_damaged_file_error_says_so(tmp_path):
    with CheckpointManager(tmp_path, async_save=False) as m:
        m.save(0, {"w": jnp.ones(3)})
    (tmp_path / "0" / "state" / "_METADATA").write_text("{")
    with CheckpointManager(tmp_path, async_save=False) as m, \
            pytest.raises(CheckpointError, match="damaged or truncated"):
        m.restore({"w": jnp.zeros(3)})


def test_damaged_config_error_says_so(tmp_path):
    # a truncated config file raised a bare JSONDecodeError from CheckpointManager.config()
    with CheckpointManager(tmp_path, async_save=False) as m:
        m.save(0, {"w": jnp.ones(3)}, config={"lr": 0.1})
        assert m.config() == {"lr": 0.1}
    (tmp_path / "0" / "config" / "metadata").write_text('{"lr": ')
    with CheckpointManager(tmp_path, async_save=False) as m, \
            pytest.raises(CheckpointError, match="config of step 0.*damaged or truncated"):
        m.config()


# ------------------------------------------------------------------------------------------------
# compact checkpoints
# ------------------------------------------------------------------------------------------------


def test_compact_refuses_colliding_paths(tmp_path):
    params = {"a/b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=r"\['a'\]\['b'\] and \['a/b'\] both have the path 'a/b'"):
        compact.save_sparse(tmp_path / "s", params, {"a/b": None, "a": {"b": None}})


@pytest.mark.parametrize("params,masks", [
    ({"e": jnp.zeros((0, 4))}, {"e": jnp.zeros((0, 4), bool)}),
    ({}, {}),
])
def test_compact_without_arrays_round_trips(tmp_path, params, masks):
    compact.save_sparse(tmp_path / "s", params, masks)
    p2, m2 = compact.load_sparse(tmp_path / "s", template=params)
    assert jax.tree.structure(p2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params), strict=True):
        assert _same_bits(a, b)
    assert jax.tree.leaves(m2) == [] or _same_bits(m2["e"], masks["e"])


def _nm_mask(rng, k, n_cols, n, m, kept=None):
    order = np.argsort(-rng.random((k // m, m, n_cols)), axis=1)
    mk = np.zeros((k // m, m, n_cols), bool)
    np.put_along_axis(mk, order[:, : n if kept is None else kept], True, axis=1)
    return mk.reshape(k, n_cols)


@pytest.mark.parametrize("n,m", [(2, 4), (2, 16), (4, 32), (1, 128)])
def test_compact_nm_bitwise_with_signed_zeros(tmp_path, n, m):
    rng = np.random.default_rng(n * m)
    mk = _nm_mask(rng, 2 * m, 6, n, m)
    w = np.where(mk, rng.standard_normal(mk.shape), 0.0).astype(jnp.bfloat16)
    w[0][mk[0]] = -0.0  # kept values that are exactly -0.0
    w[1][mk[1]] = 0.0
    params, masks = {"k": jnp.asarray(w), "b": jnp.ones(6)}, {"k": jnp.asarray(mk), "b": None}
    compact.save_sparse(tmp_path / "s", params, masks, pattern=f"{n}:{m}")
    assert type(compact.load_packed(tmp_path / "s")["k"]) is F.NMPacked
    p2, m2 = compact.load_sparse(tmp_path / "s", template=params)
    assert _same_bits(p2["k"], params["k"]) and _same_bits(m2["k"], mk) and m2["b"] is None
    assert _same_bits(p2["b"], params["b"])
    assert _same_bits(F.unpack(F.pack_nm(w, mk, n, m)), w)


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,kept", [(2, 4, 1), (4, 16, 2), (2, 8, 1)])
def test_nm_grad_of_partial_groups_matches_dense(n, m, kept):
    rng = np.random.default_rng(0)
    k, nn = 4 * m, 6
    mk = _nm_mask(rng, k, nn, n, m, kept)
    w = jnp.asarray(np.where(mk, rng.standard_normal((k, nn)), 0.0), jnp.float32)
    p = F.pack_nm(w, mk, n, m)
    x = jnp.asarray(rng.standard_normal((2, 3, k)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 3, nn)), jnp.float32)

    def loss(v):
        return jnp.sum(nm_matmul(x, F.NMPacked(v, p.indices, p.shape, n, m)) * ct)

    gv = jax.jit(jax.grad(loss))(p.values)
    gw = jax.grad(lambda w: jnp.sum(jnp.dot(x, w, precision="highest") * ct))(w)
    # one SGD step on the packed values == one masked SGD step on the dense weight
    stepped = F.unpack(F.NMPacked(p.values - 0.1 * gv, p.indices, p.shape, n, m))
    np.testing.assert_allclose(stepped, jnp.where(mk, w - 0.1 * gw, 0.0), atol=1e-5)
    assert _same_bits(F.to_mask(F.NMPacked(p.values - 0.1 * gv, p.indices, p.shape, n, m)), mk)


def test_kernel_bad_shapes_and_tiles_are_refused():
    w, mk = jnp.ones((8, 4)), jnp.ones((8, 4), bool)
    for block in ((2.5, 4), (2, 2, 2), 4):
        with pytest.raises(ValueError, match="block must be two integers"):
            F.pack_block(w, mk, block)
    b = F.pack_block(w, mk, (4, 4))
    for tm in (0, -16, 2.5, True):
        with pytest.raises(ValueError, match="tm must be an integer >= 1"):
            block_sparse_matmul(jnp.ones((3, 8)), b, tm=tm)
    p = F.pack_nm(w, mk.at[::2].set(False), 2, 4)
    with pytest.raises(ValueError, match=r"tiles \(tm, tn, th\) must be 3 integers >= 1"):
        nm_matmul(jnp.ones((3, 8)), p, tiles=(16, 4.5, 1))
    # a list x and numpy-int tiles work, and equal the dense product
    y = jax.jit(lambda x: nm_matmul(x, p, tiles=(np.int64(16), 4, 1)))(jnp.ones((3, 8)))
    np.testing.assert_allclose(y, jnp.ones((3, 8)) @ F.unpack(p), atol=1e-6)
    np.testing.assert_allclose(nm_matmul([[1.0] * 8], p), jnp.ones((1, 8)) @ F.unpack(p), atol=1e-6)


def test_sharding_rule_with_unknown_axis_names_it():
    with pytest.raises(ValueError, match="mesh has no axis 'foo'"):
        shd.param_specs({"k": jnp.ones((4, 8))}, shd.make_mesh(1, 1),
                        rules=[("k", PartitionSpec("foo"))])


def test_compact_detects_flipped_bits(tmp_path):
    import shutil

    w = jax.random.normal(jax.random.key(0), (64, 64))
    mk = jnp.asarray(_nm_mask(np.random.default_rng(0), 64, 64, 2, 4))
    params, masks = {"k": jnp.where(mk, w, 0.0)}, {"k": mk}
    compact.save_sparse(tmp_path / "s", params, masks, pattern="2:4")
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "s") for f in fs]
    data = max(files, key=os.path.getsize)  # the chunk file holding the values and codes
    size, caught = os.path.getsize(data), 0
    for i, pos in enumerate(range(size // 4, size, size // 8)):
        d = tmp_path / f"c{i}"
        shutil.copytree(tmp_path / "s", d)
        target = d / os.path.relpath(data, tmp_path / "s")
        b = bytearray(target.read_bytes())
        b[pos] ^= 0x10
        target.write_bytes(bytes(b))
        try:
            p2, m2 = compact.load_sparse(d, template=params)
        except integrity.IntegrityError as e:
            assert "of leaf 'k' is corrupted" in str(e)
            caught += 1
            continue
        except Exception:  # noqa: BLE001 - a decoder error is loud too
            continue
        assert _same_bits(p2["k"], params["k"]) and _same_bits(m2["k"], mk), pos  # never silent
    assert caught
