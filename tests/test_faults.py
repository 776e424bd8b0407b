"""Fault injection: SIGKILL a process at random moments while it saves (replacing saves included).

A *zygote* process imports jax and jaxprune once (without starting a JAX backend) and forks one
saver per kill, so each kill costs a fork instead of a fresh interpreter. A saver loops over one
shared checkpoint directory: ``save(s)`` then ``save(s, force=True)`` (a replacement) for
s = latest+1, latest+2, ..., appending ``s v`` to a log (fsynced) after each save returns. The test
kills it (SIGKILL) after a random delay, or the saver kills itself at one named stage of a
replacement (:data:`jaxprune.io.integrity.FAULT_HOOK`), and then, in this process:

* the directory opens (recovering an interrupted replacement) and its latest step restores with
  checksums verified;
* the restored state is exactly the one saved as the last committed ``(s, v)`` or, when the kill
  hit after the new data was in place, the one save in flight; never older, never a mix.

The same directory accumulates the debris of every kill, so recovery runs on it again and again.
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
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.io import checkpoint as ck
from jaxprune.io import integrity

REPO = Path(__file__).resolve().parents[1]
STAGES = ("staged", "old_moved_aside", "new_in_place", "old_deleted")

_ZYGOTE = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp, numpy as np          # imported once, backend not started
    from jaxprune.io import checkpoint as ck, integrity

    def state(step, version):
        return {"w": jnp.full((32, 32), step * 10 + version, jnp.float32),
                "tag": jnp.array([step, version], jnp.int32), "b": None}

    def saver(directory, log, stage):
        import warnings; warnings.simplefilter("ignore")
        mgr = ck.CheckpointManager(directory, async_save=False, max_to_keep=3, min_free_factor=0)
        step = (mgr.latest_step() or 0) + 1
        committed = [0]
        if stage != "-":
            def hook(name):
                if name == stage and committed[0] >= 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            integrity.FAULT_HOOK = hook
        with open(log, "a") as f:
            while True:
                for version, force in ((0, False), (1, True)):
                    mgr.save(step, state(step, version), force=force)
                    f.write(f"{step} {version}\\n"); f.flush(); os.fsync(f.fileno())
                    committed[0] += 1
                step += 1

    def exit_with_pending_save(directory, log):
        fd = os.open(log, os.O_WRONLY | os.O_CREAT)
        os.dup2(fd, 2)  # stderr to the log
        mgr = ck.CheckpointManager(directory)  # async saves, never closed
        mgr.save(1, {"w": jnp.arange(100000.0)})
        sys.exit(0)  # a normal interpreter exit: threading/atexit hooks run

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    for line in sys.stdin:
        directory, log, stage = line.split()
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            if stage == "exit":
                exit_with_pending_save(directory, log)
            try:
                saver(directory, log, stage)
            finally:
                os._exit(1)
        print(pid, flush=True)
""")


def _lines(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    return [tuple(map(int, ln.split())) for ln in log.read_text().splitlines() if ln.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    script = tmp_path_factory.mktemp("zygote") / "zygote.py"
    script.write_text(_ZYGOTE)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    yield proc
    proc.stdin.close()
    proc.kill()
    proc.wait(timeout=30)


def _kill_once(zygote, directory: Path, log: Path, stage: str, rng: random.Random) -> str:
    """Start a saver, let it commit at least one save, kill it; return how it died."""
    start = len(_lines(log))
    zygote.stdin.write(f"{directory} {log} {stage}\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    t0 = time.monotonic()
    while len(_lines(log)) <= start:
        assert time.monotonic() - t0 < 60, "the saver never committed a save"
        if not _alive(pid):
            break
        time.sleep(0.01)
    if stage == "-":
        time.sleep(rng.uniform(0.0, 0.6))  # a random moment: mid-save, mid-replacement, idle
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    while _alive(pid):  # stage kills: the saver kills itself at its next replacement
        assert time.monotonic() - t0 < 60, f"the saver did not die at stage {stage}"
        time.sleep(0.01)
    return stage


def _check(directory: Path, log: Path) -> tuple[int, int]:
    committed = _lines(log)[-1]
    nxt = (committed[0], 1) if committed[1] == 0 else (committed[0] + 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # recovery warnings are expected here
        mgr = ck.CheckpointManager(directory, async_save=False, min_free_factor=0)
    with mgr:
        template = {"w": jnp.zeros((32, 32)), "tag": jnp.zeros(2, jnp.int32), "b": None}
        out, _ = mgr.restore(template)  # verifies checksums
    got = tuple(int(t) for t in out["tag"])
    assert got in (committed, nxt), f"restored {got}, last committed {committed}"
    assert got[0] == mgr.latest_step()
    np.testing.assert_array_equal(np.asarray(out["w"]), np.full((32, 32), got[0] * 10 + got[1]))
    leftovers = [n for n in os.listdir(directory)
                 if n.endswith(integrity.REPLACED_SUFFIX) or n.startswith(integrity.STAGING_PREFIX)]
    assert not leftovers, leftovers  # recovery cleaned up
    return got


def test_async_save_is_finished_at_interpreter_exit(zygote, tmp_path):
    """A process that exits normally with an async save in flight and the manager never closed
    finishes the save (and says so) instead of losing it."""
    directory, log = tmp_path / "c", tmp_path / "stderr"
    zygote.stdin.write(f"{directory} {log} exit\n")
    zygote.stdin.flush()
    pid = int(zygote.stdout.readline())
    t0 = time.monotonic()
    while _alive(pid):
        assert time.monotonic() - t0 < 120, "the process did not exit"
        time.sleep(0.02)
    err = log.read_text()
    assert "was not closed; finishing the asynchronous save of step 1" in err, err[-2000:]
    assert "step 1 is saved" in err
    with ck.CheckpointManager(directory) as mgr:
        np.testing.assert_array_equal(mgr.restore({"w": jnp.zeros(100000)})[0]["w"],
                                      np.arange(100000.0))


def test_sigkill_during_saves_never_loses_the_last_committed_step(zygote, tmp_path):
    rng = random.Random(0)
    directory, log = tmp_path / "ckpt", tmp_path / "log"
    plan = [s for s in STAGES for _ in range(2)] + ["-"] * 12  # 8 targeted + 12 random kills
    rng.shuffle(plan)
    outcomes = []
    for stage in plan:
        _kill_once(zygote, directory, log, stage, rng)
        outcomes.append(_check(directory, log))
    assert len(outcomes) >= 20
    # the saves really advanced through many steps and replacements
    assert outcomes[-1][0] >= len(plan)
