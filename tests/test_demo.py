"""Tests for jaxprune.zoo.demo and its CLI wiring (``jaxprune demo``)."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from jaxprune import cli
from jaxprune.core import patterns as pat_lib
from jaxprune.zoo import demo


def test_quick_demo_writes_csv_and_plot(tmp_path, capsys):
    rc = cli.main(["demo", "--quick", "--no-progress", "--results-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| run" in out and "exact zeros" in out
    with open(tmp_path / "demo.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == demo.CSV_FIELDS
    runs = {r["run"]: r for r in rows}
    assert set(runs) == {"dense", "unstructured@0.9", "2:4@0.5"}
    # measured sparsity of the pruned kernels equals the target exactly (exact-count patterns)
    assert float(runs["unstructured@0.9"]["sparsity"]) == pytest.approx(0.9, abs=1e-4)
    assert float(runs["2:4@0.5"]["sparsity"]) == pytest.approx(0.5, abs=1e-6)
    assert float(runs["dense"]["sparsity"]) < 0.01
    assert all(r["exact_zeros"] == "True" for r in rows)
    # 2:4 cannot take the 1-input-channel first conv: it stays dense and is reported
    assert runs["2:4@0.5"]["dense_leaves"] == "Conv_0/kernel"
    assert runs["unstructured@0.9"]["dense_leaves"] == ""
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0 and int(r["steps"]) == demo.QUICK_STEPS
    assert float(runs["dense"]["test_acc"]) > 0.5  # learns something in 30 steps
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["demo", "--patterns", "3x3"], "unknown pattern '3x3'"),
        (["demo", "--criterion", "wanda"], "invalid choice: 'wanda'"),
        (["demo", "--criterion", "bogus"], "magnitude"),
        (["demo", "--sparsities", "1.5"], "must be in (0, 1)"),
        (["demo", "--steps", "-5"], "argument --steps: must be an integer >= 2, got -5"),
        (["demo", "--steps", "1"], "must be an integer >= 2, got 1"),
        (["demo", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["demo", "--lr", "nan"], "argument --lr: must be a finite number > 0"),
        (["demo", "--seed", "x"], "'x' is not an integer"),
    ],
)
def test_bad_arguments_exit_2_listing_choices(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    if "--criterion" in argv:
        for name in demo.TRAIN_CRITERIA:
            assert name in err
    if "--patterns" in argv:
        assert "unstructured" in err and "2:4" in err


def test_cli_help_and_bad_pattern_via_console_script():
    exe = Path(sys.executable).with_name("jaxprune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "jaxprune.cli"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout
    r = subprocess.run([*cmd, "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--criterion" in r.stdout and "--quick" in r.stdout
    r = subprocess.run([*cmd, "demo", "--patterns", "2:5:1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "unknown pattern" in r.stderr


def test_results_dir_from_env_and_atomic_writes(tmp_path, monkeypatch):
    """``$JAXPRUNE_RESULTS_DIR`` is the default; a failing plot leaves the old files intact."""
    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    assert p.parse_args([]).results_dir is None
    row = demo.DemoRow("dense", "-", "-", 0.0, 0.0, 0.0, True, 0.98, 100.0, 10, 1.0, "")
    csv_path = tmp_path / "demo.csv"
    demo.write_csv([row], csv_path)
    before = csv_path.read_bytes()
    monkeypatch.setattr(demo, "asdict", lambda r: 1 / 0)  # fails half-way through the rows
    with pytest.raises(ZeroDivisionError):
        demo.write_csv([row], csv_path)
    assert csv_path.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["demo.csv"]  # no temporary left over
    monkeypatch.undo()
    # the env var routes a run's output (the training itself is stubbed)
    monkeypatch.setenv("JAXPRUNE_RESULTS_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(demo, "run_one", lambda *a, **k: row)
    monkeypatch.setattr(demo, "plot", lambda rows, path: path.write_bytes(b"png"))
    args = p.parse_args(["--quick", "--no-progress", "--patterns", "unstructured"])
    assert demo.run(args) == 0
    lines = (tmp_path / "env" / "demo.csv").read_text().splitlines()
    assert lines[0] == ",".join(demo.CSV_FIELDS) and len(lines) == 3  # dense + unstructured@0.9
    assert (tmp_path / "env" / "demo.png").read_bytes() == b"png"


def test_training_loop_refuses_bad_counts():
    """A non-positive step count or an impossible batch fails loudly (no NaN loss, no hang)."""
    import numpy as np
    import optax

    from jaxprune.zoo import loops
    from jaxprune.zoo.models import MLP

    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int32)
    for steps in (0, -5):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            loops.train_classifier(MLP(), optax.adam(1e-3), x, y, steps=steps, progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 8\]"):
        next(loops.batches(x, y, 9, seed=0))
    with pytest.raises(ValueError, match="y has 7"):
        next(loops.batches(x, y[:7], 4, seed=0))


def test_plan_and_schedule():
    runs = demo.plan([pat_lib.Unstructured(), pat_lib.NM(2, 4)], [0.5, 0.9])
    assert [(t, p) for t, p in runs] == [
        (0.0, None), (0.5, pat_lib.Unstructured()), (0.9, pat_lib.Unstructured()),
        (0.5, pat_lib.NM(2, 4)),
    ]
    s = demo.polynomial_for(0.8, 800)
    assert s.begin == 80 and s.end == 560 and s.final_sparsity() == 0.8
    assert float(s.sparsity_at(800)) == pytest.approx(0.8)


def test_criteria_choices_are_trainable_criteria():
    from jaxprune.core.criteria import CRITERIA

    assert set(demo.TRAIN_CRITERIA) <= set(CRITERIA)
    assert "wanda" not in demo.TRAIN_CRITERIA  # needs activation statistics
