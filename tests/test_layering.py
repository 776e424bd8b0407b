"""The package layering of docs/architecture.md, enforced on every import statement (lazy ones too).

core ← training, oneshot, kernels; structured ← core, oneshot; io ← core, kernels. No library
package imports the zoo (reference models, data, loops, demo), the CLI or the experiments.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jaxprune"

# package -> jaxprune packages it may import (besides itself)
ALLOWED = {
    "core": set(),
    "training": {"core"},
    "oneshot": {"core"},
    "structured": {"core", "oneshot"},
    "kernels": {"core"},
    "io": {"core", "kernels"},
    "zoo": {"core", "training", "oneshot", "structured", "kernels", "io"},
    "cli": {"zoo", "io"},
    "__init__": {"core", "training", "io", "kernels", "oneshot", "structured"},
}
LIBRARY = ("core", "training", "oneshot", "structured", "kernels", "io")


def _package(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jaxprune":
                out += [(node.lineno, f"jaxprune.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _modules() -> list[pathlib.Path]:
    return sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layering(path: pathlib.Path) -> None:
    pkg = _package(path)
    allowed = ALLOWED[pkg] | {pkg}
    for line, mod in _imports(path):
        if mod.startswith(("experiments", "jaxprune_experiments")):
            assert pkg == "cli", f"{path}:{line} imports {mod}: only the CLI may load experiments"
        if not mod.startswith("jaxprune.") and mod != "jaxprune":
            continue
        parts = mod.split(".")
        if len(parts) == 1:
            assert pkg in ("zoo", "cli"), f"{path}:{line}: library modules import a package, not jaxprune"
            continue
        target = parts[1]
        target = target if target in ALLOWED else "__init__"
        if target == "__init__":
            continue  # names re-exported at top level, e.g. ``from jaxprune import training``
        assert target in allowed, (
            f"{path.relative_to(ROOT.parent)}:{line} imports {mod}: package '{pkg}' may import only "
            f"{sorted(allowed)} (docs/architecture.md)"
        )


def test_no_library_module_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if _package(p) in LIBRARY and (n := len(p.read_text().splitlines())) > 520}
    assert not long, f"library modules over ~500 lines: {long}"


def test_import_jaxprune_loads_no_zoo_and_no_data_packages() -> None:
    import subprocess
    import sys

    code = ("import sys, jaxprune, jaxprune.oneshot, jaxprune.structured, jaxprune.kernels, jaxprune.io;"
            "bad = [m for m in sys.modules if m.startswith(('jaxprune.zoo', 'tensorflow_datasets', "
            "'grain', 'experiments', 'jaxprune_experiments'))]; print(bad); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
