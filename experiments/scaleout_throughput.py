"""Scale-out on CPU: sparse pretraining throughput with 1 process vs 2 processes (same global mesh).

Runs :mod:`sparse_pretrain` (gradual pruning with ``global`` allocation, tiny GPT) as separate
jobs and reads back each run's median tokens/s (global tokens per second after the first,
compiling step; checkpoints only at the end):

* ``1 proc x 4 dev`` -- one process, ``--cpu-devices 4``, mesh ``data=2 x model=2``;
* ``2 proc x 2 dev`` -- ``jaxprune launch -n 2 --devices-per-process 2``, the same ``2 x 2`` mesh
  with ``data`` across the processes (gloo collectives between them);
* ``1 proc x 2 dev`` / ``2 proc x 1 dev`` -- the same comparison on 2 devices (mesh ``2 x 1``).

The mask fingerprints of each pair are compared too (they must be equal: same global mesh).

Same global batch, model and steps in every row, so the ratio is the cost of crossing a process
boundary on one machine (on CPU all processes share the same cores: this measures overhead, not
speed-up -- on a GPU/TPU cluster each process brings its own accelerators). Writes
``results/scaleout_throughput.json`` (``_quick`` for ``--quick``) and prints the table.

    python -m experiments.scaleout_throughput --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _common

#: (processes, devices per process)
CONFIGS = ((1, 4), (2, 2), (1, 2), (2, 1))
QUICK = dict(steps=30, batch=16, seq=64, d_model=64, layers=2)
FULL = dict(steps=120, batch=32, seq=128, d_model=128, layers=2)


def build_parser() -> argparse.ArgumentParser:
    """Flags: ``--quick``, ``--results-dir``, ``--steps``, ``--repeats``."""
    p = _common.parser("jaxprune run scaleout_throughput", __doc__)
    p.add_argument("--steps", type=_common.positive_int, default=None,
                   help="training steps per run (default 120, quick 30)")
    p.add_argument("--repeats", type=_common.positive_int, default=1,
                   help="runs per configuration (the table shows the median)")
    p.add_argument("--timeout", type=_common.positive_float, default=900.0,
                   help="seconds per run before it is stopped")
    return p


def _run(procs: int, devs: int, size: dict[str, int], work: Path, timeout: float) -> dict[str, Any]:
    from jaxprune.io import launch

    pkg = __package__ or "experiments"
    out = work / f"p{procs}d{devs}_{time.monotonic_ns()}.json"
    total = procs * devs
    args = ["--steps", str(size["steps"]), "--batch", str(size["batch"]), "--seq", str(size["seq"]),
            "--d-model", str(size["d_model"]), "--layers", str(size["layers"]), "--heads", "4",
            "--allocation", "global", "--prune-every", "5", "--log-every", "5",
            "--ckpt-every", str(size["steps"]), "--no-final-eval", "--mesh", f"2,{total // 2}",
            "--ckpt-dir", str(work / out.stem), "--out", str(out)]
    cmd = [sys.executable, "-m", f"{pkg}.sparse_pretrain", *args]
    # the children import the experiments package the same way this process did
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    t0 = time.perf_counter()
    if procs == 1:  # a plain single process (no distributed runtime) as the baseline
        r = subprocess.run(cmd + ["--cpu-devices", str(devs)], env=dict(os.environ, **env),
                           capture_output=True, text=True, timeout=timeout)
        rc, log = r.returncode, r.stdout + r.stderr
    else:
        with tempfile.TemporaryFile("w+") as sink:
            rc = launch.launch(cmd, procs, devices_per_process=devs, env=env, timeout=timeout,
                               stream=sink)
            sink.seek(0)
            log = sink.read()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"scaleout_throughput: {procs} x {devs} run failed ({rc}):\n{log[-3000:]}")
    metrics = json.loads(out.read_text())
    return {"tokens_per_s": metrics["tokens_per_s_median"], "wall_s": wall,
            "mesh": metrics["mesh"], "final_train_loss": metrics["final_train_loss"],
            "mask_fingerprint": metrics["mask_fingerprint"]}


def main(argv: list[str] | None = None) -> int:
    """Run every configuration, print the table, write the JSON; returns the exit code."""
    args = build_parser().parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        size["steps"] = args.steps
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for procs, devs in CONFIGS:
            runs = [_run(procs, devs, size, Path(tmp), args.timeout) for _ in range(args.repeats)]
            tps = sorted(r["tokens_per_s"] for r in runs)
            rows.append({"processes": procs, "devices_per_process": devs, "mesh": runs[0]["mesh"],
                         "tokens_per_s_median": tps[len(tps) // 2],
                         "tokens_per_s_runs": [r["tokens_per_s"] for r in runs],
                         "wall_s_runs": [round(r["wall_s"], 1) for r in runs],
                         "final_train_loss": runs[0]["final_train_loss"],
                         "mask_fingerprint": runs[0]["mask_fingerprint"]})
    base = {r["devices_per_process"] * r["processes"]: r for r in rows if r["processes"] == 1}
    for r in rows:
        r["masks_equal_to_one_process"] = (
            r["mask_fingerprint"] == base[r["processes"] * r["devices_per_process"]]["mask_fingerprint"])
    print(f"{'config':16s} {'mesh':18s} {'tokens/s':>10s} {'vs 1 proc':>9s} {'wall s':>8s} "
          f"{'final loss':>10s} {'same masks':>10s}")
    for r in rows:
        one = base[r["processes"] * r["devices_per_process"]]
        r["ratio_vs_one_process"] = r["tokens_per_s_median"] / one["tokens_per_s_median"]
        cfg = f"{r['processes']} proc x {r['devices_per_process']} dev"
        print(f"{cfg:16s} {json.dumps(r['mesh']):18s} {r['tokens_per_s_median']:10,.0f} "
              f"{r['ratio_vs_one_process']:9.2f} {max(r['wall_s_runs']):8.1f} "
              f"{r['final_train_loss']:10.4f} {str(r['masks_equal_to_one_process']):>10s}")
    import platform

    report = {"size": size, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "rows": rows,
              # other work on the machine skews CPU throughput: the 1-minute load averages
              "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
              "note": "same global mesh, batch and steps per pair; CPU processes share the cores"}
    path = _common.write_json(_common.output_path(args, "scaleout_throughput.json"), report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
