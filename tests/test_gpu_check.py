"""experiments/gpu_check.py: the dry run (every section, CPU, interpret mode) in a subprocess that
cannot import the data packages; the section guard (a failing or over-time section is reported,
the rest still run); the targets and markdown."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import gpu_check
from tests.helpers import BLOCK_DATA_PACKAGES

ROOT = Path(__file__).resolve().parents[1]

# a meta-path finder that refuses the data packages the GPU image does not have
BLOCKER = BLOCK_DATA_PACKAGES + """sys.argv = ['experiments.gpu_check'] + sys.argv[1:]
sys.path.insert(0, '.')  # as `make gpu-check` runs it: PYTHONPATH=. python -m experiments.gpu_check
import runpy
runpy.run_module('experiments.gpu_check', run_name='__main__', alter_sys=True)
"""


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "--dry-run", "--results-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, time.perf_counter() - t0


def test_dry_run_runs_every_section_without_data_packages(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted((out / "gpu").iterdir())
    assert [f.name for f in files] == ["gpu_check_cpu_dryrun.json", "gpu_check_cpu_dryrun.md"]
    res = json.loads(files[0].read_text())
    assert res["platform"] == "cpu" and "dry-run" in res["mode"]
    by_name = {s["name"]: s for s in res["sections"]}
    assert list(by_name) == [s.name for s in gpu_check.SECTIONS]
    for s in res["sections"]:
        assert s["status"] == "ok", s
        assert s["rows"], s["name"]
    assert all(r["ok"] for r in by_name["kernels"]["rows"])
    assert len(by_name["kernels"]["lowered_for_cuda"]) == 2 * len(gpu_check.LLAMA_LAYERS)
    kinds = {r["kind"] for r in by_name["bench"]["rows"]}
    assert kinds == {"dense", "2:4", "block16x16"}
    assert all(r["impl"] in ("xla", "pallas-interpret") for r in by_name["bench"]["rows"])
    assert {r["variant"].split()[0] for r in by_name["training"]["rows"]} == {"dense", "static_sparse"}
    md = files[1].read_text()
    assert md.startswith("# GPU check: cpu") and "## Targets" in md and "## bench" in md


class _Clock:
    """A manual clock for gpu_check's ``time`` module: sections advance it, nothing sleeps."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        return self.t

    def process_time(self):
        return 0.0


def test_section_guard_reports_and_continues(monkeypatch):
    clock = _Clock()

    def boom(ctx):
        ctx.add({"step": 1})
        raise RuntimeError("kernel exploded")

    def slow(ctx):
        for i in range(1000):
            ctx.add({"i": i})
            clock.t += 1.0

    def fine(ctx):
        ctx.add({"kind": "2:4", "M": 1, "K": 8, "N": 8, "speedup_vs_dense": 1.2})
        clock.t += 20.0  # uses up the rest of the budget
        return {"note": "fine"}

    monkeypatch.setattr(gpu_check, "time", clock)
    monkeypatch.setattr(gpu_check, "SECTIONS", [])
    gpu_check.section("boom", "fails", cap_s=60)(boom)
    gpu_check.section("slow", "over its cap", cap_s=10)(slow)
    gpu_check.section("bench", "fine", cap_s=60)(fine)
    gpu_check.section("late", "no budget left", cap_s=60)(fine)
    res = gpu_check.run_sections(dry_run=False, budget_s=35.0)
    status = {s["name"]: s["status"] for s in res}
    assert status == {"boom": "failed", "slow": "timeout", "bench": "ok", "late": "skipped"}
    boom, slow, fine = res[0], res[1], res[2]
    assert "kernel exploded" in boom["error"] and boom["rows"] == [{"step": 1}]
    assert slow["seconds"] == 11.0 and len(slow["rows"]) == 12  # stopped past its cap, rows kept
    assert fine["note"] == "fine" and fine["cap_s"] == 24.0  # min(60, what is left of 35 s)
    t = gpu_check.targets(res)
    assert t[0]["met"] is False and t[0]["worst_speedup"] == 1.2 and t[1]["met"] is None
    md = gpu_check.markdown({"device": "X", "sections": res, "targets": t})
    assert "status **failed**" in md and "kernel exploded" in md and "| 2:4 at M in [1, 16]" in md


def test_main_refuses_cpu_without_dry_run(capsys):
    assert gpu_check.main(["--results-dir", "/nonexistent-never-written"]) == 2
    assert "--dry-run" in capsys.readouterr().err
