"""Multi-process sparse training on JAX's distributed runtime: 2 processes x 2 CPU devices.

One launch of the sparse pretraining experiment as a 2-process job (``jaxprune.io.launch``,
gloo collectives, a 2x2 mesh with ``data`` across the processes) with global-allocation gradual
pruning; the last process crashes right after the step-4 checkpoint. Checked: the launcher fails
fast with the crashed process's exit code; the masks were identical on both processes at every
checkpoint (the experiment asserts it, a failure would exit 1, not 13); the 2-process checkpoint
resumes in ONE process (2 -> 1, restart after the fault) and the final params and masks equal an
uninterrupted single-process run on the same 2x2 mesh **bit for bit** (two-operand cross-process
sums are exact, so no tolerance is needed). The launcher and the consistency check are also
tested without JAX processes.
"""

from __future__ import annotations

import os
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
           *_tiny("--ckpt-dir", d / "mp", "--crash-after", "4")]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    job: dict = {}

    def run_job() -> None:
        try:
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
        ref_rc = sp.main(_tiny("--mesh", "2,2", "--ckpt-dir", d / "ref",
                               "--dump-state", d / "ref.npz"))
    finally:
        thread.join()
    if "error" in job:
        raise job["error"]
    assert ref_rc == 0
    rc, returned = job["rc"], job["returned"]
    from jaxprune.io import checkpoint as ck

    with ck.CheckpointManager(d / "mp") as mgr:
        steps_after_crash = mgr.all_steps()
    # restart after the fault in ONE process from the 2-process checkpoint (2 -> 1)
    resumed_rc = sp.main(_tiny("--mesh", "2,2", "--ckpt-dir", d / "mp", "--resume",
                               "--dump-state", d / "resumed.npz"))
    return dict(dir=d, rc=rc, clock=clock, returned=returned, steps=steps_after_crash,
                resumed_rc=resumed_rc)


def test_two_processes_train_on_one_global_mesh_and_fail_fast(runs):
    text = "\n".join(ln for _, ln in runs["clock"].lines)
    assert runs["rc"] == 13, text  # the injected crash, not a consistency failure (1) or a hang
    assert "mesh={'data': 2, 'model': 2} devices=4 (cpu, 2 processes)" in text, text
    crash = runs["clock"].first("exits abruptly")
    assert crash is not None, text
    assert runs["returned"] - crash < FAIL_FAST_BOUND, text
    assert "[launch] process 1 exited with 13" in text
    # both processes logged the same (replicated) losses at steps 2 and 4
    for step in (2, 4):
        losses = {ln.split("]")[0]: ln.split("loss")[1].split()[0] for _, ln in runs["clock"].lines
                  if f"step      {step}  loss" in ln}
        assert len(losses) == 2 and len(set(losses.values())) == 1, losses
    # the crash came after the step-4 checkpoint was complete; nothing later was committed
    assert runs["steps"] == [2, 4]
    # each process wrote its own part of the one orbax checkpoint (OCDBT: one store per process)
    assert {p.name for p in (runs["dir"] / "mp" / "4" / "state").glob("ocdbt.process_*")} == {
        "ocdbt.process_0", "ocdbt.process_1"}


def test_resume_two_to_one_equals_single_process_run_bit_for_bit(runs):
    assert runs["resumed_rc"] == 0
    ref = np.load(runs["dir"] / "ref.npz")
    got = np.load(runs["dir"] / "resumed.npz")
    assert sorted(ref) == sorted(got) and any(k.startswith("masks/") for k in ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    kernels = [k for k in ref if k.startswith("masks/")]
    density = sum(ref[k].sum() for k in kernels) / sum(ref[k].size for k in kernels)
    assert density == pytest.approx(0.2, abs=0.01)


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
