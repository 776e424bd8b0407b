"""Sparse training on digits CNN: dense, gradual magnitude, static, SET, RigL (ERK/uniform).

Trains the small digits CNN (``jaxprune.zoo.models.CNN``) at 80/90/95% sparsity with every method over
several seeds and reports test accuracy mean ± std. Dynamic methods use the paper's defaults scaled
to the short run: drop fraction 0.3, cosine annealed until 75% of training, ``ΔT`` = steps / 12.

    jaxprune run sparse_training            # full run (a few CPU minutes)
    jaxprune run sparse_training --quick    # smoke test
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxprune as jp
from jaxprune.training.dst import rigl, set_training, static_sparse
from jaxprune.zoo.data import load_digits
from jaxprune.zoo.loops import accuracy, train_classifier
from jaxprune.zoo.models import CNN

from . import _common

# (label, method, allocation)
METHODS = [
    ("gradual magnitude", "gmp", "uniform"),
    ("static (ERK)", "static", "erk"),
    ("SET (ERK)", "set", "erk"),
    ("RigL (ERK)", "rigl", "erk"),
    ("RigL (uniform)", "rigl", "uniform"),
]


def make_tx(method: str, allocation: str, sparsity: float, steps: int, period: int, lr: float,
            seed: int) -> optax.GradientTransformation:
    """The optimizer for one configuration (adam inside every pruning transform)."""
    inner = optax.adam(lr)
    key = jax.random.key(1000 + seed)
    if method == "dense":
        return inner
    if method == "gmp":
        return jp.gradual_magnitude(inner, sparsity, begin=steps // 10, end=int(0.75 * steps),
                                    freq=period)
    if method == "static":
        return static_sparse(inner, sparsity, allocation=allocation, key=key)
    fn = rigl if method == "rigl" else set_training
    return fn(inner, sparsity, allocation=allocation, total_steps=steps,
              update_period=period, key=key)


def main(argv: list[str] | None = None) -> int:
    """Run the study; write ``results/sparse_training.csv`` and ``.png``; print a table."""
    ap = _common.parser("jaxprune run sparse_training", __doc__, steps=300, seeds=3, lr=3e-3)
    ap.add_argument("--sparsities", type=_common.unit_fraction, nargs="+", default=[0.8, 0.9, 0.95])
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.sparsities = 24, 1, [0.9]
    period = max(1, args.steps // 12)
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    model = CNN(channels=(16, 32), hidden=64)
    configs = [("dense", "dense", "-", 0.0)] + [
        (label, m, a, s) for s in args.sparsities for (label, m, a) in METHODS
    ]
    from tqdm.auto import tqdm

    rows = []
    t0 = time.perf_counter()
    with tqdm(total=len(configs) * args.seeds, desc="sparse_training") as bar:
        for label, method, alloc, s in configs:
            for seed in range(args.seeds):
                tx = make_tx(method, alloc, s, args.steps, period, args.lr, seed)
                every = period if method in ("set", "rigl") else None  # host-told updates
                params, state, _ = train_classifier(model, tx, x, y, steps=args.steps,
                                                    batch_size=64, seed=seed, progress=False,
                                                    mask_update_every=every)
                if method == "dense":
                    measured = 0.0
                else:
                    masks = jp.get_masks(state)
                    measured = jp.total_sparsity(params, masks)
                    zeros = jp.total_sparsity(jp.apply_masks(params, masks), masks)
                    assert abs(zeros - measured) < 1e-9
                acc = accuracy(model.apply, params, xt, yt)
                rows.append({"method": label, "sparsity": s, "seed": seed,
                             "measured_sparsity": round(measured, 4), "test_acc": acc})
                bar.update(1)
    elapsed = time.perf_counter() - t0
    _common.write_csv(_common.output_path(args, "sparse_training.csv"), rows)
    summary = summarize(rows)
    print(f"\ndigits CNN, {args.steps} steps, {args.seeds} seeds, {elapsed:.0f}s")
    print(f"{'method':20s} {'sparsity':>8s} {'measured':>9s} {'test acc (mean ± std)':>22s}")
    for (label, s), (m, sd, ms) in summary.items():
        print(f"{label:20s} {s:8.2f} {ms:9.4f} {100 * m:14.2f} ± {100 * sd:4.2f}")
    plot(summary, _common.output_path(args, "sparse_training.png"))
    return 0


def summarize(rows: list[dict]) -> dict:
    """``{(method, sparsity): (mean acc, std acc, mean measured sparsity)}``."""
    out: dict = {}
    keys = list(dict.fromkeys((r["method"], r["sparsity"]) for r in rows))
    for k in keys:
        sel = [r for r in rows if (r["method"], r["sparsity"]) == k]
        a = np.array([r["test_acc"] for r in sel])
        out[k] = (float(a.mean()), float(a.std()), float(np.mean([r["measured_sparsity"]
                                                                  for r in sel])))
    return out


def plot(summary: dict, path: Path) -> None:
    """Accuracy vs sparsity per method, error bars = std over seeds."""
    dense = [v for (m, _), v in summary.items() if m == "dense"]
    series = {}
    for label, _, _ in METHODS:
        pts = sorted((s, v) for (m, s), v in summary.items() if m == label)
        series[label] = ([s for s, _ in pts], [100 * v[0] for _, v in pts], [100 * v[1] for _, v in pts])
    _common.errorbar_plot(path, series, xlabel="sparsity", ylabel="test accuracy (%)",
                          title="digits CNN: sparse training",
                          hline=(100 * dense[0][0], "dense") if dense else None)


if __name__ == "__main__":
    raise SystemExit(main())
