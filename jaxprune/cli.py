"""The ``jaxprune`` command: ``jaxprune demo``, ``jaxprune run <experiment>`` and
``jaxprune launch -n N -- <command>`` (a multi-process JAX job on this machine,
:mod:`jaxprune.io.launch`).

Experiments are the modules of the package ``jaxprune_experiments`` (the repository's
``experiments/`` folder, shipped in the wheel under that name) that define
``main(argv: list[str] | None) -> int``; ``jaxprune run --list`` shows them. They are found with
:mod:`pkgutil` and read with :mod:`ast` (listing imports nothing); results go to ``./results`` of
the current directory unless ``--results-dir`` or ``$JAXPRUNE_RESULTS_DIR`` says otherwise.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pkgutil
import sys
from types import ModuleType

#: the installed package holding the experiments; a source checkout without an install falls back
#: to its ``experiments`` folder (importable from the repository root)
EXPERIMENT_PACKAGES = ("jaxprune_experiments", "experiments")


def _experiments_package() -> ModuleType | None:
    for name in EXPERIMENT_PACKAGES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def list_experiments() -> dict[str, str]:
    """``{name: first docstring line}`` for every experiment module that defines ``main``."""
    pkg = _experiments_package()
    if pkg is None:
        return {}
    out: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        spec = importlib.util.find_spec(f"{pkg.__name__}.{info.name}")
        source = spec.loader.get_source(spec.name) if spec and spec.loader else None
        if not source:
            continue
        tree = ast.parse(source)
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        doc = ast.get_docstring(tree) or ""
        out[info.name] = doc.strip().split("\n", 1)[0].strip()
    return out


def import_experiment(name: str) -> ModuleType:
    """The experiment module ``name`` (from ``jaxprune_experiments``)."""
    pkg = _experiments_package()
    if pkg is None:
        raise SystemExit("jaxprune run: the experiments package (jaxprune_experiments) is not installed")
    return importlib.import_module(f"{pkg.__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxprune`` argument parser (sub-commands ``demo`` and ``run``)."""
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
        "run", help="run an experiment: " + ", ".join(exps) if exps else "run an experiment",
        description="Run an experiment; arguments after its name go to the experiment "
                    "(`jaxprune run NAME --help` shows them).",
    )
    run.add_argument("name", nargs="?", choices=sorted(exps) or None, help="experiment name")
    run.add_argument("--list", action="store_true", help="list experiments and exit")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the experiment")
    launch = sub.add_parser(
        "launch", help="run a command as N processes of one JAX job on 127.0.0.1 (fails fast)",
        description="Start N processes of COMMAND with the environment "
                    "jaxprune.io.distributed.initialize() reads (coordinator on a free local port, "
                    "process count and id, CPU devices per process); prefix their output; if one "
                    "fails, stop the others and exit with its code.",
    )
    launch.add_argument("-n", "--num-processes", type=int, required=True, help="processes")
    launch.add_argument("--devices-per-process", type=int, default=None,
                        help="CPU devices per process (jax_num_cpu_devices)")
    launch.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    launch.add_argument("--grace", type=float, default=5.0,
                        help="seconds between SIGTERM and SIGKILL when stopping (default 5)")
    launch.add_argument("--timeout", type=float, default=None, help="wall-clock limit (seconds)")
    launch.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
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
            exps = list_experiments()
            if not exps:
                print("no experiments found: install the jaxprune wheel (it ships "
                      "jaxprune_experiments)", file=sys.stderr)
                return 1
            for name, doc in exps.items():
                print(f"{name:28s} {doc}")
            return 0
        rest = args.args[1:] if args.args[:1] == ["--"] else args.args
        mod = import_experiment(args.name)
        return int(mod.main(rest) or 0)
    if args.command == "launch":
        from jaxprune.io import launch as launch_lib

        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("launch: give the command after `--`")
        try:
            return launch_lib.launch(cmd, args.num_processes,
                                     devices_per_process=args.devices_per_process,
                                     port=args.port, grace=args.grace, timeout=args.timeout)
        except ValueError as e:
            parser.error(str(e))
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
