"""The ``jaxprune`` command: ``jaxprune demo`` and ``jaxprune run <experiment>``.

Experiments are the modules ``experiments/<name>.py`` of the repository that define
``main(argv: list[str] | None) -> int``; ``jaxprune run --list`` shows them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = REPO_ROOT / "experiments"


def list_experiments() -> dict[str, str]:
    """``{name: first docstring line}`` for every runnable module in ``experiments/``."""
    out: dict[str, str] = {}
    if not EXPERIMENTS_DIR.is_dir():
        return out
    for f in sorted(EXPERIMENTS_DIR.glob("*.py")):
        if f.name.startswith("_"):
            continue
        text = f.read_text()
        if "def main(" not in text:
            continue
        doc = ""
        if text.lstrip().startswith(('"""', "'''")):
            doc = text.lstrip()[3:].split("\n", 1)[0].strip().rstrip('"').strip()
        out[f.stem] = doc
    return out


def _import_experiment(name: str):
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(f"experiments.{name}")


def build_parser() -> argparse.ArgumentParser:
    exps = list_experiments()
    p = argparse.ArgumentParser(
        prog="jaxprune",
        description="jaxprune: pruning as pure transforms over JAX parameter pytrees.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train the digits CNN dense and with gradual magnitude pruning; table + plot"
    )
    from jaxprune.zoo import demo as demo_lib

    demo_lib.add_arguments(demo)
    run = sub.add_parser(
        "run", help="run an experiment: " + ", ".join(exps) if exps else "run an experiment"
    )
    run.add_argument("name", nargs="?", choices=sorted(exps) or None, help="experiment name")
    run.add_argument("--list", action="store_true", help="list experiments and exit")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the experiment")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jaxprune`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from jaxprune.zoo import demo as demo_lib

        return int(demo_lib.run(args) or 0)
    if args.command == "run":
        if args.list or args.name is None:
            for name, doc in list_experiments().items():
                print(f"{name:28s} {doc}")
            return 0
        mod = _import_experiment(args.name)
        return int(mod.main(args.args) or 0)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
