"""Start N processes of one command on this machine as a JAX multi-process job; fail fast.

``jaxprune launch -n 2 --devices-per-process 2 -- python -m experiments.sparse_pretrain ...``
runs the command N times with the environment :func:`jaxprune.io.distributed.initialize` reads
(coordinator ``127.0.0.1:<free port>``, process count and id, CPU devices per process). Output
lines are prefixed with ``[p<id>]``. **Fail fast**: as soon as one process exits non-zero (or is
killed), the others get ``SIGTERM`` and, ``grace`` seconds later, ``SIGKILL`` -- a JAX process
blocked in a collective waiting for a dead peer would otherwise hang -- and :func:`launch` returns
that first non-zero exit code (``128 + signal`` for a signal). ``timeout`` bounds the whole job
the same way (exit code :data:`TIMEOUT_EXIT`). Every process runs in its own session, so the
whole process group of each (its children too) is signalled; Ctrl-C or ``SIGTERM`` to the
launcher stops all of them the same way.

Example:
    >>> import sys
    >>> launch([sys.executable, "-c", "import os; print(os.environ['JAXPRUNE_PROCESS_ID'])"], 2,
    ...        stream=None)
    0
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from jaxprune.io.distributed import (
    ENV_COORDINATOR,
    ENV_LOCAL_DEVICES,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
)

__all__ = ["free_port", "launch", "TIMEOUT_EXIT"]

#: exit code of :func:`launch` when ``timeout`` expired
TIMEOUT_EXIT = 124


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bound to port 0, then released).

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pump(pipe: IO[bytes], prefix: str, out: IO[str] | None, lock: threading.Lock) -> None:
    for raw in iter(pipe.readline, b""):
        if out is not None:
            line = raw.decode(errors="replace").rstrip("\n")
            with lock:
                out.write(f"{prefix}{line}\n")
                out.flush()
    pipe.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    grace: float = 5.0,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    stream: IO[str] | None | str = "stdout",
) -> int:
    """Run ``command`` as ``num_processes`` processes of one JAX job; return the job's exit code.

    0 when every process exits 0; else the first failing process's code (``128 + signal`` when it
    was killed), after the others were terminated (``SIGTERM``, then ``SIGKILL`` after ``grace``
    seconds); :data:`TIMEOUT_EXIT` when ``timeout`` seconds pass first. ``env`` adds variables;
    output lines go to ``stream`` prefixed ``[p<id>] `` (default: the current ``sys.stdout``;
    ``None`` discards them).

    >>> import sys
    >>> launch([sys.executable, "-c", "import sys; sys.exit(3)"], 2, stream=None)
    3
    """
    if num_processes < 1:
        raise ValueError(f"jaxprune launch: -n must be >= 1, got {num_processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(
            f"jaxprune launch: --devices-per-process must be >= 1, got {devices_per_process}"
        )
    if not command:
        raise ValueError("jaxprune launch: no command given (put it after `--`)")
    if isinstance(stream, str):
        stream = sys.stdout
    port = free_port(host) if port is None else int(port)
    base = dict(os.environ)
    base.update(env or {})
    base.update({ENV_COORDINATOR: f"{host}:{port}", ENV_NUM_PROCESSES: str(num_processes),
                 "PYTHONUNBUFFERED": "1"})
    if devices_per_process is not None:
        base[ENV_LOCAL_DEVICES] = str(devices_per_process)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    old_term = None
    if threading.current_thread() is threading.main_thread():
        # a SIGTERM to the launcher stops the job too (the children run in their own sessions)
        old_term = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        for i in range(num_processes):
            penv = dict(base, **{ENV_PROCESS_ID: str(i)})
            p = subprocess.Popen(list(command), env=penv, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", stream, lock),
                                 daemon=True)
            t.start()
            pumps.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        code = 0
        while True:
            rcs = [p.poll() for p in procs]
            failed = [(i, rc) for i, rc in enumerate(rcs) if rc not in (None, 0)]
            if failed:
                i, rc = failed[0]
                code = _exit_code(rc)
                if stream is not None:
                    with lock:
                        stream.write(f"[launch] process {i} exited with {code}; stopping the "
                                     f"others (SIGTERM, SIGKILL after {grace:g}s)\n")
                break
            if all(rc == 0 for rc in rcs):
                break
            if deadline is not None and time.monotonic() > deadline:
                code = TIMEOUT_EXIT
                if stream is not None:
                    with lock:
                        stream.write(f"[launch] timeout after {timeout:g}s; stopping all\n")
                break
            time.sleep(0.05)
    finally:
        _stop(procs, grace)
        for t in pumps:
            t.join(timeout=grace)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    return code


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    end = time.monotonic() + grace
    while any(p.poll() is None for p in alive) and time.monotonic() < end:
        time.sleep(0.05)
    for p in alive:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
    for p in alive:
        p.wait()
