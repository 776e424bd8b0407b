"""The ``jaxprune`` command, the packaged experiments and their shared plumbing (``_common``)."""

from __future__ import annotations

import argparse
import doctest
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxprune import cli
from jaxprune_experiments import _common

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.py") if not p.stem.startswith("_"))


def _console(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("jaxprune")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "jaxprune.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)


# ------------------------------------------------------------------------------------------------
# packaging: the wheel holds the experiments, `jaxprune run` works outside a checkout
# ------------------------------------------------------------------------------------------------
def test_wheel_ships_every_module_and_runs_outside_the_repo(tmp_path):
    src = tmp_path / "src"  # build from a copy: nothing (build/, egg-info) lands in the checkout
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("jaxprune", "experiments"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("jaxprune-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for mod in EXPERIMENTS + ["__init__", "_common"]:
        assert f"jaxprune_experiments/{mod}.py" in names, mod
    for f in (REPO / "jaxprune").rglob("*.py"):  # every library module, every subpackage
        rel = f.relative_to(REPO).as_posix()
        if "__pycache__" not in rel:
            assert rel in names, f"{rel} is missing from the wheel: list its package in pyproject.toml"
    assert not any(n.startswith(("experiments/", "tests/")) for n in names)
    ep = next(n for n in names if n.endswith("entry_points.txt"))
    assert "jaxprune = jaxprune.cli:main" in zipfile.ZipFile(whl).read(ep).decode()

    # the unpacked wheel, imported ahead of the editable checkout, from a directory outside the repo
    site = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop(_common.RESULTS_ENV, None)
    code = ("import sys, jaxprune, jaxprune_experiments; from jaxprune.cli import main; "
            "print(jaxprune.__file__); print(jaxprune_experiments.__file__); "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "run", "--list"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site))
    listed = [ln.split()[0] for ln in lines[2:]]
    assert listed == EXPERIMENTS
    # an experiment's bad flag is refused before anything is written
    r = subprocess.run([sys.executable, "-c", code, "run", "sparse_training", "--seeds", "0"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "argument --seeds: must be a positive integer" in r.stderr
    assert list(work.iterdir()) == []


def test_console_script_lists_experiments_from_any_directory(tmp_path):
    r = _console("run", "--list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [ln.split()[0] for ln in r.stdout.splitlines()] == EXPERIMENTS
    assert "Sparse training on digits CNN" in r.stdout
    assert list(tmp_path.iterdir()) == []  # listing writes nothing


def test_list_reads_sources_without_importing(monkeypatch):
    before = set(sys.modules)
    exps = cli.list_experiments()
    assert sorted(exps) == EXPERIMENTS and all(exps.values())
    assert not {m for m in set(sys.modules) - before if m.startswith("jaxprune_experiments.")}


def test_unknown_experiment_exits_2_listing_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "no_such_study"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no_such_study'" in err and "sparse_training" in err


def test_every_experiment_uses_the_shared_plumbing():
    """No experiment finds results through its own file location or writes results by hand."""
    for name in EXPERIMENTS:
        text = (REPO / "experiments" / f"{name}.py").read_text()
        assert "_common.parser(" in text, name
        assert "Path(__file__)" not in text and "parents[1]" not in text, name
        assert "csv.DictWriter" not in text and ".write_text(" not in text, name
        assert "from experiments" not in text, name  # relative imports: works as jaxprune_experiments
        assert "matplotlib.use(" not in text and "pyplot" not in text, name


# ------------------------------------------------------------------------------------------------
# common flags
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--steps", "-5"], "argument --steps: must be a positive integer (>= 1), got -5"),
    (["--steps", "0"], "argument --steps: must be a positive integer (>= 1), got 0"),
    (["--steps", "1.5"], "argument --steps: '1.5' is not an integer"),
    (["--seeds", "0"], "argument --seeds: must be a positive integer (>= 1), got 0"),
    (["--lr=-1e-3"], "argument --lr: must be a finite number > 0"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0"),
    (["--sparsities", "1.0"], "argument --sparsities: must be in (0, 1), got 1.0"),
])
def test_common_flags_are_validated(argv, needle, capsys):
    ap = _common.parser("jaxprune run x", steps=10, seeds=2, lr=1e-3)
    ap.add_argument("--sparsities", type=_common.unit_fraction, nargs="+", default=[0.5])
    with pytest.raises(SystemExit) as e:
        ap.parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_common_flags_defaults_and_values():
    ap = _common.parser("jaxprune run x", steps=10, seeds=2, lr=1e-3)
    a = ap.parse_args([])
    assert (a.quick, a.results_dir, a.steps, a.seeds, a.lr) == (False, None, 10, 2, 1e-3)
    a = ap.parse_args(["--quick", "--steps", "7", "--seeds", "1", "--results-dir", "r"])
    assert (a.quick, a.steps, a.seeds, a.results_dir) == (True, 7, 1, Path("r"))
    bare = _common.parser("jaxprune run y").parse_args([])
    assert not hasattr(bare, "steps") and not hasattr(bare, "seeds")


@pytest.mark.parametrize("argv", [["sparse_training", "--seeds", "0"],
                                  ["sparse_training", "--steps", "-5"],
                                  ["sparse_pretrain", "--steps", "-5"]])
def test_bad_counts_leave_results_untouched(tmp_path, argv, capsys):
    """Issue #13: `--seeds 0` emptied the committed CSV; `--steps -5` wrote a checkpoint."""
    old = tmp_path / "sparse_training.csv"
    old.write_text("method,sparsity\nRigL,0.9\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["run", *argv, "--results-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err
    assert old.read_text() == "method,sparsity\nRigL,0.9\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse_training.csv"]


# ------------------------------------------------------------------------------------------------
# results directory
# ------------------------------------------------------------------------------------------------
def test_results_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(_common.RESULTS_ENV, raising=False)
    assert _common.results_dir() == Path("results") and (tmp_path / "results").is_dir()
    monkeypatch.setenv(_common.RESULTS_ENV, str(tmp_path / "env"))
    assert _common.results_dir(argparse.Namespace(results_dir=None)) == tmp_path / "env"
    assert _common.results_dir(argparse.Namespace(results_dir=tmp_path / "flag")) == tmp_path / "flag"
    assert _common.results_dir(tmp_path / "given", create=False) == tmp_path / "given"
    assert not (tmp_path / "given").exists()
    a = argparse.Namespace(results_dir=tmp_path / "f", quick=False)
    assert _common.output_path(a, "pai.png") == tmp_path / "f" / "pai.png"
    a.quick = True
    assert _common.output_path(a, "pai.png") == tmp_path / "f" / "pai_quick.png"


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
def _only(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_open_keeps_the_old_file_when_the_writer_raises(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("old\n")
    os.chmod(p, 0o640)
    with pytest.raises(RuntimeError, match="mid-write"):
        with _common.atomic_open(p) as f:
            f.write("new partial content\n" * 1000)
            f.flush()
            raise RuntimeError("mid-write")
    assert p.read_text() == "old\n" and _only(tmp_path) == ["r.csv"]
    with _common.atomic_open(p) as f:
        f.write("new\n")
    assert p.read_text() == "new\n" and _only(tmp_path) == ["r.csv"]
    assert p.stat().st_mode & 0o777 == 0o640  # permissions of the replaced file are kept


def test_write_csv_failing_mid_table_or_empty_leaves_old_file(tmp_path):
    p = tmp_path / "sparse_training.csv"
    p.write_text("committed\n")
    rows = [{"method": "a", "acc": 1.0}] * 500 + [{"method": "b", "bogus": 2}]
    with pytest.raises(ValueError, match="bogus"):  # DictWriter fails on the last row
        _common.write_csv(p, rows)
    assert p.read_text() == "committed\n"
    with pytest.raises(ValueError, match="no rows to write"):
        _common.write_csv(p, [])
    assert p.read_text() == "committed\n" and _only(tmp_path) == ["sparse_training.csv"]
    _common.write_csv(tmp_path / "sub" / "new.csv", rows[:2])  # creates the directory
    assert (tmp_path / "sub" / "new.csv").read_text().splitlines() == ["method,acc", "a,1.0", "a,1.0"]


def test_write_json_and_figure_are_atomic(tmp_path):
    p = tmp_path / "r.json"
    _common.write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        _common.write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    png = tmp_path / "e.png"
    _common.errorbar_plot(png, {"m": ([0.5, 0.9], [90.0, 80.0], [1.0, 2.0]), "empty": ([], [], [])},
                          xlabel="sparsity", ylabel="acc", hline=(95.0, "dense"), xscale="log",
                          invert_x=True)
    assert png.read_bytes()[:4] == b"\x89PNG"
    fig, _ = _common.figure()
    fig.savefig = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("render failed"))
    with pytest.raises(RuntimeError, match="render failed"):
        _common.save_figure(fig, png)
    assert png.read_bytes()[:4] == b"\x89PNG" and _only(tmp_path) == ["e.png", "r.json"]


def test_common_doctests():
    res = doctest.testmod(_common, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 10 and res.failed == 0


# ------------------------------------------------------------------------------------------------
# shared table printer and the trained byte LMs
# ------------------------------------------------------------------------------------------------
def test_format_table_matches_hand_written_fstrings():
    rows = [("gpt", 3.14159, 7, "2:4"), ("a much longer name", -0.5, 123456, "")]
    got = _common.format_table([("model", "8s"), ("ppl", "8.3f"), ("n", "5d"), ("pat", ">4")], rows)
    want = [f"{'model':8s} {'ppl':>8s} {'n':>5s} {'pat':>4s}"]
    want += [f"{m:8s} {p:8.3f} {n:5d} {t:>4}" for m, p, n, t in rows]  # values wider than the column too
    assert got == "\n".join(want)
    assert _common.format_table([("x", "=+6d"), ("y", "*^7s")], [(5, "ab")], sep="|") == \
        f"{'x':>6}|{'y':^7}\n{5:=+6d}|{'ab':*^7s}"
    with pytest.raises(ValueError, match=r"row 1 has 1 cells for 2 columns \(a, b\)"):
        _common.format_table([("a", "3d"), ("b", "3d")], [(1, 2), (3,)])
    with pytest.raises(ValueError, match="column 'b' has an invalid format spec '3q'"):
        _common.format_table([("a", "3d"), ("b", "3q")], [])


def test_load_or_train_lm_trains_once_then_loads_and_quick_writes_nothing(tmp_path):
    import jax

    from jaxprune.zoo.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(d=8, layers=2, heads=2, seq=4, layer_ffn=[4, 12])  # a tuple field: JSON -> tuple
    calls = []

    def train():
        calls.append(1)
        shapes = _common.lm_template(GPT, cfg)
        p = jax.tree.map(lambda s: np.random.default_rng(len(calls)).normal(size=s.shape).astype(s.dtype),
                         shapes)
        return p, {"val_ppl": 2.5, "steps": len(calls)}

    _, p0, _ = _common.load_or_train_lm("tiny", GPT, cfg, train, save=False, results=tmp_path)
    assert calls == [1] and list(tmp_path.iterdir()) == []  # a smoke run saves nothing
    c1, p1, i1 = _common.load_or_train_lm("tiny", GPT, cfg, train, results=tmp_path)
    assert len(calls) == 2 and sorted(f.name for f in tmp_path.iterdir()) == \
        ["tiny_config.json", "tiny_params.msgpack"]
    c2, p2, i2 = _common.load_or_train_lm("tiny", GPT, cfg, train, results=tmp_path)
    assert len(calls) == 2  # loaded, not trained
    assert c2 == cfg and c2.layer_ffn == (4, 12) and i2 == i1 == {"val_ppl": 2.5, "steps": 2}
    assert jax.tree.structure(p2) == jax.tree.structure(p1)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, p3, _ = _common.load_or_train_lm("tiny", GPT, cfg, train, retrain=True, results=tmp_path)
    assert len(calls) == 3 and _common.load_model("tiny", lambda c: (c, p3), tmp_path)[2]["steps"] == 3


def test_finish_lm_training_saves_unless_quick(tmp_path):
    info = {"steps": 3, "batch": 2, "train_seconds": 1.5, "final_train_loss": 4.25, "val_ppl": 70.0,
            "params": 1234}
    cfg = argparse.Namespace(_asdict=lambda: {"d": 8})
    quick = argparse.Namespace(quick=True, results_dir=tmp_path)
    table = _common.finish_lm_training(quick, "lm", {"w": np.ones(2)}, cfg, info, ("params", ">8", "params"))
    assert list(tmp_path.iterdir()) == []
    assert table.splitlines() == [f"{'steps':>6} {'batch':>5} {'seconds':>8} {'train loss':>10} "
                                  f"{'val ppl':>8} {'params':>8}",
                                  f"{3:>6} {2:>5} {1.5:>8} {4.25:>10.3f} {70.0:>8.3f} {1234:>8}"]
    full = argparse.Namespace(quick=False, results_dir=tmp_path)
    assert _common.finish_lm_training(full, "lm", {"w": np.ones(2)}, cfg, info).splitlines() == \
        [line[:-9] for line in table.splitlines()]  # the same without the 9-character extra column
    assert sorted(f.name for f in tmp_path.iterdir()) == ["lm_config.json", "lm_params.msgpack",
                                                          "train_lm.json"]
    assert json.loads((tmp_path / "train_lm.json").read_text()) == info
    assert json.loads((tmp_path / "lm_config.json").read_text()) == {"config": {"d": 8}, "info": info}
