"""``jaxprune demo``: train the digits CNN dense and with gradual pruning; print a table, save a plot.

Each pruned run wraps Adam in :func:`jaxprune.pruner` with a Zhu & Gupta
:class:`~jaxprune.core.schedules.Polynomial` schedule (prune from 10% to 70% of the steps, ~15 mask
updates, then fine-tune with fixed masks) and trains with :func:`jaxprune.zoo.loops.train_classifier`.
Unstructured runs go to every ``--sparsities`` target; an N:M pattern runs once, at its own
sparsity ``1 - n/m``. Kernels whose shape a pattern cannot take (the 1-channel first conv under
2:4) stay dense and are listed. After training the demo checks that every pruned weight is
exactly ``0.0`` and reports the measured sparsity of the pruned leaves
(:func:`jaxprune.total_sparsity` of the params themselves, not of the masks).

Writes ``demo.csv`` and ``demo.png`` (test accuracy vs sparsity) to ``--results-dir`` (default
``$JAXPRUNE_RESULTS_DIR``, else ``./results``), each through a temporary file that replaces the old
one only when complete.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> a = p.parse_args(["--quick", "--patterns", "unstructured,2:4"])
    >>> a.quick, [str(x) for x in a.patterns]
    (True, ['Unstructured()', 'NM(n=2, m=4, axis=None)'])
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core import filters as jp_filters
from jaxprune.core import masks as masks_lib
from jaxprune.core import patterns as pat_lib
from jaxprune.core import schedules as sched_lib
from jaxprune.core.masks import PyTree, total_sparsity, tree_map_masked
from jaxprune.training import get_masks, pruner

__all__ = ["TRAIN_CRITERIA", "DemoRow", "add_arguments", "run", "run_one", "main"]

#: criteria that training can feed (``wanda`` needs activation statistics: one-shot only)
TRAIN_CRITERIA = ("magnitude", "random", "saliency", "taylor", "movement")
DEFAULT_STEPS = 800
QUICK_STEPS = 30
#: environment variable naming the default results directory (``--results-dir`` wins over it)
RESULTS_ENV = "JAXPRUNE_RESULTS_DIR"
CSV_FIELDS = (
    "run", "pattern", "criterion", "target", "sparsity", "mask_sparsity", "exact_zeros",
    "test_acc", "steps_per_s", "steps", "seconds", "dense_leaves",
)


@dataclass
class DemoRow:
    """One trained run: ``sparsity`` is measured on the params (zeros / size of pruned leaves)."""

    run: str
    pattern: str
    criterion: str
    target: float
    sparsity: float
    mask_sparsity: float
    exact_zeros: bool
    test_acc: float
    steps_per_s: float
    steps: int
    seconds: float
    dense_leaves: str


def _pattern_arg(text: str) -> list[pat_lib.Pattern]:
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            out.append(pat_lib.parse(part))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("jaxprune: ")) from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one pattern, e.g. 'unstructured,2:4'")
    return out


def _int_at_least(lo: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {v}")
        return v

    parse.__name__ = f"integer >= {lo}"
    return parse


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _sparsities_arg(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{part}' is not a number") from None
        if not 0.0 < v < 1.0:
            raise argparse.ArgumentTypeError(f"sparsity {v} must be in (0, 1)")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one sparsity, e.g. '0.5,0.9'")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (the ``jaxprune demo`` sub-command).

    >>> p = argparse.ArgumentParser(); add_arguments(p)
    >>> p.parse_args(["--sparsities", "0.5,0.75"]).sparsities
    [0.5, 0.75]
    """
    parser.add_argument("--steps", type=_int_at_least(2), default=None,
                        help=f"training steps per run (default {DEFAULT_STEPS}, "
                             f"{QUICK_STEPS} with --quick)")
    parser.add_argument("--sparsities", type=_sparsities_arg, default=None,
                        help="comma-separated unstructured targets (default 0.5,0.8,0.9,0.95; "
                             "0.9 with --quick)")
    parser.add_argument("--patterns", type=_pattern_arg, default=_pattern_arg("unstructured,2:4"),
                        help="comma-separated patterns: unstructured, N:M (e.g. 2:4), blockRxC, "
                             "channel (default unstructured,2:4)")
    parser.add_argument("--criterion", choices=TRAIN_CRITERIA, default="magnitude",
                        help="pruning criterion (default magnitude)")
    parser.add_argument("--quick", action="store_true",
                        help="30 steps, one unstructured target (0.9): a smoke test")
    parser.add_argument("--results-dir", type=Path, default=None, metavar="DIR",
                        help=f"directory for demo.csv and demo.png (default ${RESULTS_ENV}, "
                             "else ./results)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=64,
                        help="batch size (default 64)")
    parser.add_argument("--lr", type=_positive_float, default=1e-3,
                        help="Adam learning rate (default 1e-3)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="init / data-order seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def polynomial_for(target: float, steps: int) -> sched_lib.Polynomial:
    """The demo's schedule: ramp from 10% to 70% of ``steps`` with ~15 mask updates.

    >>> polynomial_for(0.9, 1000)
    Polynomial(sparsity=0.9, begin=100, end=700, freq=40, initial=0.0, power=3.0)
    """
    begin = max(1, int(0.1 * steps))
    end = max(begin + 1, int(0.7 * steps))
    return sched_lib.Polynomial(target, begin, end, freq=max(1, (end - begin) // 15))


def _pattern_filter(pattern: pat_lib.Pattern) -> tuple[Any, list[str]]:
    """Prune ``kernel`` leaves the pattern fits; list the ones it cannot take (kept dense)."""
    base = jp_filters.select()
    skipped: list[str] = []

    def fits(path: str, leaf: Any) -> bool:
        try:
            pat_lib.for_path(pattern, path).validate(path, tuple(leaf.shape))
        except ValueError:
            skipped.append(path)
            return False
        return True

    return jp_filters.select(predicate=lambda p, x: base(p, x) and fits(p, x)), skipped


def _pruned_leaves(params: PyTree, masks: PyTree) -> PyTree:
    return tree_map_masked(lambda m, p: None if m is None else p, masks, params)


def _exact_zeros(params: PyTree, masks: PyTree) -> bool:
    ok = tree_map_masked(
        lambda m, p: True if m is None else bool(jnp.all(jnp.where(m, True, p == 0.0))),
        masks, params,
    )
    return all(jax.tree.leaves(ok))


def run_one(
    target: float,
    pattern: pat_lib.Pattern | None,
    *,
    criterion: str = "magnitude",
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
    data: tuple[np.ndarray, ...] | None = None,
) -> DemoRow:
    """Train the digits CNN once (``pattern=None``: dense) and measure it.

    >>> row = run_one(0.5, pat_lib.Unstructured(), steps=12)
    >>> row.exact_zeros, row.sparsity
    (True, 0.5)
    """
    from jaxprune.zoo.data import load_digits
    from jaxprune.zoo.loops import accuracy, train_classifier
    from jaxprune.zoo.models import CNN

    x, y, xt, yt = data if data is not None else (*load_digits("train"), *load_digits("test"))
    model = CNN()
    inner = optax.adam(lr)
    skipped: list[str] = []
    if pattern is None:
        tx, name, pat_name = inner, "dense", "-"
    else:
        filt, skipped = _pattern_filter(pattern)
        tx = pruner(
            inner,
            schedule=polynomial_for(target, steps),
            criterion=criterion,
            pattern=pattern,
            filter=filt,
            key=jax.random.key(seed) if criterion == "random" else None,
        )
        pat_name = _pattern_name(pattern)
        name = f"{pat_name}@{target:g}"
    t0 = time.perf_counter()
    params, opt_state, hist = train_classifier(
        model, tx, x, y, steps=steps, batch_size=batch_size, seed=seed, progress=progress,
        desc=name,
    )
    seconds = time.perf_counter() - t0
    if pattern is None:
        masks = masks_lib.init_masks(params)  # measure the same kernels as the pruned runs
    else:
        masks = get_masks(opt_state)
    acc = accuracy(model.apply, params, xt, yt)
    return DemoRow(
        run=name,
        pattern=pat_name,
        criterion=criterion if pattern is not None else "-",
        target=float(target),
        sparsity=total_sparsity(_pruned_leaves(params, masks)),
        mask_sparsity=total_sparsity(params, masks),
        exact_zeros=_exact_zeros(params, masks),
        test_acc=acc,
        steps_per_s=float(hist["steps_per_s"]),
        steps=steps,
        seconds=seconds,
        dense_leaves=";".join(sorted(set(skipped))),
    )


def _pattern_name(p: pat_lib.Pattern) -> str:
    if isinstance(p, pat_lib.NM):
        return f"{p.n}:{p.m}"
    if isinstance(p, pat_lib.Block):
        return f"block{p.r}x{p.c}"
    return type(p).__name__.lower()


def plan(patterns: list[pat_lib.Pattern], sparsities: list[float]) -> list[tuple[float, Any]]:
    """``[(target, pattern)]``: dense first, N:M at ``1 - n/m``, others at each reachable target.

    >>> [(t, str(p)) for t, p in plan([pat_lib.NM(2, 4)], [0.9])]
    [(0.0, 'None'), (0.5, 'NM(n=2, m=4, axis=None)')]
    """
    runs: list[tuple[float, Any]] = [(0.0, None)]
    for p in patterns:
        if isinstance(p, pat_lib.NM):
            runs.append((p.max_sparsity(), p))
        else:
            runs.extend((s, p) for s in sparsities if s <= p.max_sparsity())
    seen, out = set(), []
    for t, p in runs:
        if (t, p) not in seen:
            seen.add((t, p))
            out.append((t, p))
    return out


def format_table(rows: list[DemoRow]) -> str:
    """The results as an aligned text table (also valid Markdown).

    >>> r = DemoRow("dense", "-", "-", 0.0, 0.0, 0.0, True, 0.98, 100.0, 10, 1.0, "")
    >>> print(format_table([r]).splitlines()[2])
    | dense | -       | 0.00   | 0.00%    | yes         | 98.00%   | 100.0   |
    """
    head = ("run", "pattern", "target", "sparsity", "exact zeros", "test acc", "steps/s")
    body = [
        (r.run, r.pattern, f"{r.target:.2f}", f"{100 * r.sparsity:.2f}%",
         "yes" if r.exact_zeros else "NO", f"{100 * r.test_acc:.2f}%", f"{r.steps_per_s:.1f}")
        for r in rows
    ]
    w = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(k) for c, k in zip(cells, w, strict=True)) + " |"
    sep = "|" + "|".join("-" * (k + 2) for k in w) + "|"
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then move it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(rows: list[DemoRow], path: Path) -> None:
    """Write ``rows`` to ``path`` with the columns of :data:`CSV_FIELDS` (atomically).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "demo.csv"
    >>> write_csv([DemoRow("dense", "-", "-", 0.0, 0.0, 0.0, True, 0.98, 100.0, 10, 1.0, "")], p)
    >>> p.read_text().splitlines()[1]
    'dense,-,-,0.0,0.0,0.0,True,0.98,100.0,10,1.0,'
    """
    f = io.StringIO(newline="")
    wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    wr.writeheader()
    for r in rows:
        wr.writerow({k: v for k, v in asdict(r).items() if k in CSV_FIELDS})
    _replace_file(Path(path), f.getvalue().encode())


def plot(rows: list[DemoRow], path: Path) -> None:
    """Test accuracy vs measured sparsity, one line per pattern, dense as a dashed line."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot / global backend state

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    dense = [r for r in rows if r.pattern == "-"]
    for r in dense:
        ax.axhline(100 * r.test_acc, color="gray", ls="--", label=f"dense ({100 * r.test_acc:.1f}%)")
    for pat in dict.fromkeys(r.pattern for r in rows if r.pattern != "-"):
        rs = sorted((r for r in rows if r.pattern == pat), key=lambda r: r.sparsity)
        ax.plot([100 * r.sparsity for r in rs], [100 * r.test_acc for r in rs], "o-", label=pat)
    ax.set_xlabel("sparsity of pruned kernels (%)")
    ax.set_ylabel("test accuracy (%)")
    crit = next((r.criterion for r in rows if r.criterion != "-"), "magnitude")
    steps = rows[0].steps if rows else 0
    ax.set_title(f"digits CNN, gradual {crit} pruning, {steps} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png")
    _replace_file(Path(path), buf.getvalue())


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``args`` (from :func:`add_arguments`); returns the exit code.

    Exit code 1 if any pruned run left a nonzero weight where its mask is off.
    """
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if steps < 2:
        raise SystemExit("jaxprune demo: --steps must be >= 2")
    sparsities = args.sparsities or ([0.9] if args.quick else [0.5, 0.8, 0.9, 0.95])
    out = Path(args.results_dir or os.environ.get(RESULTS_ENV) or "results")
    out.mkdir(parents=True, exist_ok=True)
    from jaxprune.zoo.data import load_digits

    data = (*load_digits("train"), *load_digits("test"))
    runs = plan(list(args.patterns), sparsities)
    progress = not args.no_progress
    rows = []
    t_all = time.perf_counter()
    it: Any = runs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(runs, desc="demo runs", unit="run")
    for target, pattern in it:
        row = run_one(
            target, pattern, criterion=args.criterion, steps=steps, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed, progress=progress, data=data,
        )
        rows.append(row)
        msg = (f"{row.run:>18s}: sparsity {100 * row.sparsity:6.2f}%  "
               f"acc {100 * row.test_acc:6.2f}%  {row.steps_per_s:6.1f} steps/s")
        if progress:
            it.write(msg)
    total = time.perf_counter() - t_all
    print(f"\ndigits CNN (Adam lr={args.lr}, batch {args.batch_size}, {steps} steps, "
          f"criterion {args.criterion}); sparsity = zeros in pruned kernels")
    print(format_table(rows))
    for r in rows:
        if r.dense_leaves:
            print(f"note: {r.run} keeps {r.dense_leaves.replace(';', ', ')} dense "
                  "(the pattern does not fit its shape)")
    write_csv(rows, out / "demo.csv")
    plot(rows, out / "demo.png")
    print(f"wrote {out / 'demo.csv'} and {out / 'demo.png'} ({total:.0f} s)")
    bad = [r.run for r in rows if not r.exact_zeros]
    if bad:
        print(f"ERROR: pruned weights are not exactly zero in: {', '.join(bad)}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxprune.zoo.demo [options]`` (same as ``jaxprune demo``)."""
    parser = argparse.ArgumentParser(prog="jaxprune demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    raise SystemExit(main())
