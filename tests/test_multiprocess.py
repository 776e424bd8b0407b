"""Multi-process sparse training on JAX's distributed runtime: 2 processes x 2 CPU devices.

One chain of the sparse pretraining experiment (global-allocation gradual pruning, data through
grain with per-process sharding, the grain iterator state in every orbax checkpoint):

1. ONE process trains steps 1-6 uninterrupted (the reference), checkpointing steps 2, 4 and 6
   (one data state file each);
2. as soon as its step-2 checkpoint is on disk, a 2-process job (``jaxprune.io.launch``, gloo
   collectives, a 2x2 mesh with ``data`` across the processes) resumes a copy of it (**1 -> 2**),
   trains steps 3-4, and the last process crashes right after the step-4 checkpoint (two data
   state files);
3. ONE process resumes that checkpoint (**2 -> 1**, restart after the fault) to step 6.

Checked: the launcher fails fast with the crashed process's exit code; the masks were identical on
both processes at every checkpoint (the experiment asserts it, a failure would exit 1, not 13);
both processes logged the loss and the mask sparsity of step 4 (the latter reduced on the devices
over global arrays spanning both processes) equal to the uninterrupted single-process reference's; the
final params and masks after 1 -> 2 -> 1 equal an uninterrupted single-process run on the same 2x2
mesh **bit for bit** (two-operand cross-process sums are exact, so no tolerance is needed) -- any
batch seen out of place would change them. The launcher, the data-state merge and the consistency
check are also tested without JAX processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.io import data as data_lib
from jaxprune.io import distributed as dist
from jaxprune.io import launch as launch_lib
from jaxprune.io import sharding as shd

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "6", "--batch", "8", "--seq", "16", "--d-model", "16", "--layers", "1",
        "--heads", "2", "--prune-every", "2", "--ckpt-every", "2", "--log-every", "2",
        "--corpus-bytes", "20000", "--allocation", "global", "--prune-begin", "0",
        "--prune-end", "0.7", "--sparsity", "0.8", "--no-final-eval"]
GRACE = 2.0  # launcher: seconds between SIGTERM and SIGKILL
FAIL_FAST_BOUND = GRACE + 15.0  # crash line seen -> launcher returned (generous for a 2-core CI)


class _Clock:
    """A text stream that keeps every line with the time it arrived."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.lines += [(time.monotonic(), ln) for ln in text.splitlines() if ln]

    def flush(self) -> None:
        pass

    def first(self, needle: str) -> float | None:
        return next((t for t, ln in self.lines if needle in ln), None)


def _tiny(*extra: str | Path) -> list[str]:
    return TINY + [str(e) for e in extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from experiments import sparse_pretrain as sp

    d = tmp_path_factory.mktemp("mp")
    clock = _Clock()
    cmd = [sys.executable, "-m", "experiments.sparse_pretrain",
           *_tiny("--ckpt-dir", d / "mp", "--resume", "--crash-after", "4")]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    job: dict = {}
    ref_done = threading.Event()

    def run_job() -> None:
        try:
            # the reference's step-2 checkpoint (written by ONE process) starts the 2-process
            # job: it resumes it (1 -> 2) while the reference goes on to step 6
            step2 = d / "ref" / "2"
            while not (step2 / "_CHECKPOINT_METADATA").exists() and not ref_done.is_set():
                time.sleep(0.1)
            if not step2.exists():
                raise RuntimeError("the reference run wrote no step-2 checkpoint")
            shutil.copytree(step2, d / "mp" / "2")
            job["rc"] = launch_lib.launch(cmd, 2, devices_per_process=2, grace=GRACE,
                                          timeout=300, env=env, stream=clock)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            job["error"] = e
        job["returned"] = time.monotonic()

    # the 2-process job runs while this process computes the reference (the cores overlap)
    thread = threading.Thread(target=run_job)
    thread.start()
    try:
        # reference: one process, the same 2x2 mesh (4 of this process's 8 CPU devices)
        ref_out = io.StringIO()
        with contextlib.redirect_stdout(ref_out):
            ref_rc = sp.main(_tiny("--mesh", "2,2", "--ckpt-dir", d / "ref", "--keep", "3",
                                   "--dump-state", d / "ref.npz"))
    finally:
        ref_done.set()
        thread.join()
    if "error" in job:
        raise job["error"]
    assert ref_rc == 0
    rc, returned = job["rc"], job["returned"]
    from jaxprune.io import checkpoint as ck

    with ck.CheckpointManager(d / "mp") as mgr:
        steps_after_crash = mgr.all_steps()
    data_files = {s: sorted(f.name for f in (d / "mp" / str(s) / "data").glob("*.json"))
                  for s in steps_after_crash}
    # restart after the fault in ONE process from the 2-process checkpoint (2 -> 1)
    resumed_rc = sp.main(_tiny("--mesh", "2,2", "--ckpt-dir", d / "mp", "--resume",
                               "--dump-state", d / "resumed.npz"))
    return dict(dir=d, rc=rc, clock=clock, returned=returned, steps=steps_after_crash,
                resumed_rc=resumed_rc, ref_log=ref_out.getvalue(), data_files=data_files)


def test_two_processes_train_on_one_global_mesh_and_fail_fast(runs):
    text = "\n".join(ln for _, ln in runs["clock"].lines)
    assert runs["rc"] == 13, text  # the injected crash, not a consistency failure (1) or a hang
    assert "mesh={'data': 2, 'model': 2} devices=4 (cpu, 2 processes)" in text, text
    crash = runs["clock"].first("exits abruptly")
    assert crash is not None, text
    assert runs["returned"] - crash < FAIL_FAST_BOUND, text
    assert "[launch] process 1 exited with 13" in text
    # both processes resumed the 1-process checkpoint with the data iterator at global batch 2
    resumed = [ln for _, ln in runs["clock"].lines if "resumed from step 2" in ln]
    assert len(resumed) == 2 and all("data at global batch 2)" in ln for ln in resumed), text
    # both processes logged the reference's loss and exact mask sparsity at step 4 (sparsity:
    # reduced on the devices over global arrays; the reference counts host copies with numpy)
    ref = [ln.split("tokens/s")[0] for ln in runs["ref_log"].splitlines()
           if ln.startswith("step      4  loss")]
    got = [ln.split("] ", 1)[1].split("tokens/s")[0] for _, ln in runs["clock"].lines
           if "step      4  loss" in ln]
    assert len(ref) == 1 and got == ref * 2, (got, ref)
    # the crash came after the step-4 checkpoint was complete; nothing later was committed
    assert runs["steps"] == [2, 4]
    # step 2 holds the one process's grain iterator state, step 4 one per process
    assert runs["data_files"] == {2: ["process_0-of-1.json"],
                                  4: ["process_0-of-2.json", "process_1-of-2.json"]}
    for name in runs["data_files"][4]:
        state = json.loads((runs["dir"] / "mp" / "4" / "data" / name).read_text())
        assert state["global_step"] == 4 and state["grain"] == {"next_index": 4}
    # each process wrote its own part of the one orbax checkpoint (OCDBT: one store per process)
    assert {p.name for p in (runs["dir"] / "mp" / "4" / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0", "ocdbt.process_1"}


def test_resume_one_to_two_to_one_equals_single_process_run_bit_for_bit(runs):
    assert runs["resumed_rc"] == 0
    ref = np.load(runs["dir"] / "ref.npz")
    got = np.load(runs["dir"] / "resumed.npz")
    assert sorted(ref) == sorted(got) and any(k.startswith("masks/") for k in ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    kernels = [k for k in ref if k.startswith("masks/")]
    density = sum(ref[k].sum() for k in kernels) / sum(ref[k].size for k in kernels)
    assert density == pytest.approx(0.2, abs=0.01)


def test_resume_refuses_a_data_state_that_disagrees_with_the_train_state(runs, capsys):
    from experiments import sparse_pretrain as sp

    bad = runs["dir"] / "bad"
    shutil.copytree(runs["dir"] / "mp" / "4", bad / "4")
    for f in (bad / "4" / "data").glob("process_*.json"):  # both processes "one batch behind"
        state = json.loads(f.read_text())
        f.write_text(json.dumps(dict(state, global_step=3, grain={"next_index": 3})))
    assert sp.main(_tiny("--mesh", "2,2", "--ckpt-dir", bad, "--resume")) == 1
    assert ("data iterator is at global batch 3 but its train state consumed 4; refusing"
            in capsys.readouterr().out)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_launcher_env_prefix_and_success():
    clock = _Clock()
    code = ("import os; e = os.environ; print('pid', e['JAXPRUNE_PROCESS_ID'], 'of', "
            "e['JAXPRUNE_NUM_PROCESSES'], e['JAXPRUNE_COORDINATOR_ADDRESS'].split(':')[0], "
            "e['JAXPRUNE_LOCAL_DEVICES'])")
    assert launch_lib.launch(_py(code), 3, devices_per_process=2, stream=clock) == 0
    lines = sorted(ln for _, ln in clock.lines)
    assert lines == [f"[p{i}] pid {i} of 3 127.0.0.1 2" for i in range(3)]


def test_launcher_kills_survivors_that_ignore_sigterm():
    # process 1 fails; process 0 ignores SIGTERM and would sleep for 10 minutes
    code = ("import os, signal, sys, time; pid = int(os.environ['JAXPRUNE_PROCESS_ID']);"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True);"
            "time.sleep(0.5); sys.exit(5) if pid == 1 else time.sleep(600)")
    clock = _Clock()
    t0 = time.monotonic()
    assert launch_lib.launch(_py(code), 2, grace=1.0, stream=clock) == 5
    assert time.monotonic() - t0 < 30  # returned after SIGKILL, no hang
    assert any("process 1 exited with 5" in ln for _, ln in clock.lines)


def test_launcher_reports_signals_and_timeouts():
    kill_self = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert launch_lib.launch(_py(kill_self), 1, stream=None) == 128 + signal.SIGKILL
    assert launch_lib.launch(_py("import time; time.sleep(600)"), 2, timeout=0.5, grace=0.5,
                             stream=None) == launch_lib.TIMEOUT_EXIT
    with pytest.raises(ValueError, match="-n must be >= 1"):
        launch_lib.launch(_py("pass"), 0)


def test_sigterm_to_the_launcher_stops_the_job():
    import subprocess

    child = "import os, time; print('child', os.getpid(), flush=True); time.sleep(600)"
    code = ("import sys; from jaxprune.io.launch import launch; "
            f"sys.exit(launch([sys.executable, '-c', {child!r}], 2, grace=1.0))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(proc.stdout.readline().split()[-1]) for _ in range(2)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in pids:  # both children are gone (reaped by the launcher)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_cli_launch_subcommand(capsys):
    from jaxprune import cli

    code = "import os; print('hello', os.environ['JAXPRUNE_PROCESS_ID'])"
    assert cli.main(["launch", "-n", "2", "--", sys.executable, "-c", code]) == 0
    out = capsys.readouterr().out
    assert "[p0] hello 0" in out and "[p1] hello 1" in out
    assert cli.main(["launch", "-n", "2", "--", *_py("import sys; sys.exit(7)")]) == 7


def test_fingerprint_detects_replicas_that_differ():
    devs = jax.devices()[:2]
    mesh = shd.make_mesh(1, 2, devices=devs)
    rep = NamedSharding(mesh, P())
    same = jax.make_array_from_single_device_arrays(
        (4,), rep, [jax.device_put(np.arange(4.0, dtype=np.float32), d) for d in devs])
    fp = dist.assert_consistent({"w": same, "none": None}, "params")
    assert list(fp) == ["w"]
    # the fingerprint depends on the value and the sharding, not on which device holds a copy
    assert fp == dist.tree_fingerprint({"w": jax.device_put(np.arange(4.0, dtype=np.float32), rep)})
    bad = jax.make_array_from_single_device_arrays(
        (4,), rep, [jax.device_put(np.arange(4.0, dtype=np.float32) + i, d)
                    for i, d in enumerate(devs)])
    with pytest.raises(dist.InconsistentAcrossProcessesError, match="leaf 'w' differs"):
        dist.assert_consistent({"w": bad})


def test_put_global_to_host_and_process_rows():
    mesh = dist.global_mesh(2, 2)
    tree = {"k": np.arange(12, dtype=np.float32).reshape(3, 4), "rng": jax.random.key(3),
            "m": None}
    sh = {"k": NamedSharding(mesh, P(None, "model")), "rng": NamedSharding(mesh, P()),
          "m": None}
    out = dist.put_global(tree, sh)
    assert out["k"].sharding == sh["k"] and out["m"] is None
    assert np.array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(tree["rng"]))
    back = dist.to_host(out)
    np.testing.assert_array_equal(back["k"], tree["k"])
    np.testing.assert_array_equal(back["rng"], jax.random.key_data(tree["rng"]))
    assert dist.process_rows(8) == slice(0, 8)
    assert dist.process_rows(8, shd.batch_sharding(mesh)) == slice(0, 8)
    with pytest.raises(ValueError, match="are not contiguous"):
        dist.process_rows(8, _SplitRows())


class _SplitRows:
    """A process whose two devices hold rows 0-1 and 4-5 (a mesh not ordered by process)."""

    def addressable_devices_indices_map(self, shape):
        return {"d0": (slice(0, 2),), "d2": (slice(4, 6),)}


def test_initialize_validates_its_configuration(monkeypatch):
    monkeypatch.setenv(dist.ENV_COORDINATOR, "127.0.0.1:1")
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        dist.initialize()
    monkeypatch.setenv(dist.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(dist.ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 2"):
        dist.initialize()
    monkeypatch.setenv(dist.ENV_PROCESS_ID, "one")
    with pytest.raises(ValueError, match="JAXPRUNE_PROCESS_ID='one' is not an integer"):
        dist.initialize()
    monkeypatch.delenv(dist.ENV_COORDINATOR)
    monkeypatch.delenv(dist.ENV_NUM_PROCESSES)
    monkeypatch.delenv(dist.ENV_PROCESS_ID)
    assert dist.initialize() is False


class _Rows:
    """The batch sharding as seen by one process that holds rows ``lo:hi`` (on one device)."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def addressable_devices_indices_map(self, shape):
        return {"d": (slice(self.lo, self.hi),)}


def _job(n: int, batch: int, source, key: str = "k") -> list[data_lib.ProcessBatches]:
    """The data pipelines of the ``n`` processes of a job (simulated by their row blocks)."""
    per = batch // n
    return [data_lib.ProcessBatches(source, batch, _Rows(p * per, (p + 1) * per), key=key)
            for p in range(n)]


def test_process_batches_shard_rows_and_resume_under_any_process_count(tmp_path):
    from etils import epath

    batch, steps = 8, 5
    source = np.arange((steps * batch + 3) * 2).reshape(-1, 2)  # 3 trailing records unused
    oracle = [source[t * batch:(t + 1) * batch] for t in range(steps)]  # global batch t
    for n in (1, 2, 4):
        job = _job(n, batch, source)
        assert [it.shard.shard_index for it in job] == list(range(n))
        assert all(it.shard.shard_count == n and it.steps == steps for it in job)
        for t in range(steps):  # each process reads only its rows; together: the global batch
            np.testing.assert_array_equal(np.concatenate([next(it) for it in job]), oracle[t])
        with pytest.raises(StopIteration):
            next(job[0])
    # two processes consume 3 global batches and save; 1, 2 and 4 processes resume from that
    job = _job(2, batch, source)
    for _ in range(3):
        [next(it) for it in job]
    save_dir = epath.Path(tmp_path / "data")
    save_dir.mkdir()
    for p, it in enumerate(job):  # what the handler writes on process p of 2
        (save_dir / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
    handler = data_lib.ProcessBatchesHandler()
    for n in (1, 2, 4):
        resumed = _job(n, batch, source)
        for it in resumed:
            assert handler.restore(save_dir, data_lib.ProcessBatchesRestore(it))["global_step"] == 3
        assert all(it.position == 3 for it in resumed)
        for t in (3, 4):
            np.testing.assert_array_equal(np.concatenate([next(it) for it in resumed]), oracle[t])
    # a mismatch is an error, never different data
    fresh = _job(1, batch, source)[0]
    with pytest.raises(data_lib.DataStateError, match="global_batch=8, this pipeline has global_batch=4"):
        _job(1, 4, source)[0].set_state(job[0].get_state())
    with pytest.raises(data_lib.DataStateError, match="key='k', this pipeline has key='other'"):
        _job(1, batch, source, key="other")[0].set_state(job[0].get_state())
    behind = dict(job[1].get_state(), global_step=2, grain={"next_index": 2})
    (save_dir / "process_1-of-2.json").write_text(json.dumps(behind))
    with pytest.raises(data_lib.DataStateError, match=r"differ between process 0 and process 1 of 2 "
                       r"in \['global_step'\] \(\[3\] vs \[2\]\)"):
        handler.restore(save_dir, data_lib.ProcessBatchesRestore(fresh))
    (save_dir / "process_1-of-2.json").unlink()
    with pytest.raises(data_lib.DataStateError, match=r"process\(es\) \[1\] of 2 is missing"):
        handler.restore(save_dir, data_lib.ProcessBatchesRestore(fresh))
    with pytest.raises(data_lib.DataStateError, match="unexpected grain iterator state"):
        fresh.set_state(dict(job[0].get_state(), grain={"next_index": 3, "epoch": 0}))
    assert fresh.position == 0  # untouched by the refused states
    with pytest.raises(ValueError, match="rows 2:6 of a 8-row batch are not an aligned block"):
        data_lib.ProcessBatches(source, batch, _Rows(2, 6))


def test_checkpoint_manager_saves_the_data_state_as_an_item(tmp_path):
    from jaxprune.io import checkpoint as ck

    source = np.arange(40)
    it = data_lib.ProcessBatches(source, 4, key="k")
    state = {"w": np.ones(3, np.float32)}
    handlers = {"data": data_lib.ProcessBatchesHandler()}
    with ck.CheckpointManager(tmp_path, async_save=False, items=handlers) as mgr:
        mgr.save(1, state)  # a step without the data item
        next(it), next(it)
        mgr.save(2, state, items={"data": data_lib.ProcessBatchesSave(it.get_state())})
        next(it)  # the iterator moves on; the checkpoint keeps the state of step 2
        back = data_lib.ProcessBatches(source, 4, key="k")
        mgr.restore(state, items={"data": data_lib.ProcessBatchesRestore(back)})
        assert back.position == 2
        np.testing.assert_array_equal(next(back), [8, 9, 10, 11])
        # force=True replaces step 2 (staged, then swapped in) with the data item too
        mgr.save(2, state, force=True, items={"data": data_lib.ProcessBatchesSave(it.get_state())})
        mgr.restore(state, items={"data": data_lib.ProcessBatchesRestore(back)})
        assert back.position == 3
        with pytest.raises(ck.CheckpointError, match="step 1 .* has no 'data' item"):
            mgr.restore(state, 1, items={"data": data_lib.ProcessBatchesRestore(back)})
        with pytest.raises(ValueError, match="item 'loader' was not declared"):
            mgr.save(3, state, items={"loader": data_lib.ProcessBatchesSave(it.get_state())})
    with pytest.raises(ValueError, match="items may not be named"):
        ck.CheckpointManager(tmp_path, items={"state": data_lib.ProcessBatchesHandler()})


_STATS_CODE = """
import numpy as np, jax
from jaxprune.io import distributed as dist
dist.initialize()
import jaxprune as jp
from jax.sharding import NamedSharding, PartitionSpec as P
rng = np.random.default_rng(0)  # the same host values on every process
w = rng.normal(size=(6, 8)).astype(np.float32)
w[rng.random(w.shape) < 0.4] = 0
m = rng.random((6, 8)) < 0.3
mesh = dist.global_mesh(1, 4)  # 'model' spans both processes: each holds half of each leaf
sh, sh_b = NamedSharding(mesh, P(None, "model")), NamedSharding(mesh, P("model"))
params, masks = dist.put_global(({"w": w, "b": w[0]}, {"w": m, "b": None}),
                                ({"w": sh, "b": sh_b}, {"w": sh, "b": None}))
assert not params["w"].is_fully_addressable
st = {s.path: (s.zeros, s.size) for s in jp.sparsity_stats(params, masks)}
zeros_w, zeros_b = int((w == 0).sum()), int((w[0] == 0).sum())
print("RESULT", st == {"w": (48 - int(m.sum()), 48), "b": (zeros_b, 8)},
      jp.total_sparsity(params, masks) == (48 - int(m.sum())) / 48,
      jp.total_sparsity(params) == (zeros_w + zeros_b) / 56, flush=True)
"""


def test_mask_statistics_of_arrays_spread_over_processes():
    """jp.sparsity_stats / total_sparsity on leaves no process holds in full (2 processes x 2
    devices, 'model' across the processes) equal the numpy counts of the full host arrays."""
    clock = _Clock()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rc = launch_lib.launch(_py(_STATS_CODE), 2, devices_per_process=2, timeout=120, env=env,
                           stream=clock)
    text = "\n".join(ln for _, ln in clock.lines)
    assert rc == 0, text
    assert sorted(ln.split("RESULT")[1].split() for _, ln in clock.lines if "RESULT" in ln) == [
        ["True", "True", "True"]] * 2, text
