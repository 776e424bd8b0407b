"""Pruning at init on digits CNN: SNIP vs GraSP vs SynFlow vs random at 90/99/99.9%, layer collapse.

Masks are computed once at initialisation (global allocation, no per-layer floor, as in the
papers), then the sparse network is trained with the mask fixed. Reports test accuracy and which
layers were pruned away entirely (layer collapse, Tanaka et al. 2020).

    jaxprune run pai            # full run (a few CPU minutes)
    jaxprune run pai --quick    # smoke test
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxprune as jp
from jaxprune.training import pai
from jaxprune.zoo.data import load_digits
from jaxprune.zoo.loops import accuracy, batches, cross_entropy
from jaxprune.zoo.models import CNN

from . import _common

METHODS = ["random", "SNIP", "GraSP", "SynFlow"]


def compute(method: str, model: CNN, params, batch, sparsity: float, seed: int,
            synflow_rounds: int):
    """Masks for ``method`` at ``sparsity`` from the initial ``params``."""

    def loss(p, b):
        return cross_entropy(model.apply({"params": p}, b[0]), b[1])

    if method == "SNIP":
        return pai.snip(loss, params, batch, sparsity)[1]
    if method == "GraSP":
        return pai.grasp(loss, params, batch, sparsity)[1]
    if method == "SynFlow":
        return pai.synflow(lambda p, x: model.apply({"params": p}, x), params, (1, 8, 8, 1),
                           sparsity, rounds=synflow_rounds)[1]
    masks = jp.init_masks(params)
    scores = jp.criteria.random(params, masks, key=jax.random.key(500 + seed))
    return pai.masks_from_scores(masks, scores, sparsity)


def main(argv: list[str] | None = None) -> int:
    """Run the study; write ``results/pai.csv`` and ``.png``; print a table."""
    ap = _common.parser("jaxprune run pai", __doc__, steps=300, seeds=2, lr=3e-3)
    ap.add_argument("--sparsities", type=_common.unit_fraction, nargs="+", default=[0.9, 0.99, 0.999])
    ap.add_argument("--synflow-rounds", type=_common.positive_int, default=100)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.sparsities, args.synflow_rounds = 10, 1, [0.99], 3
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    model = CNN(channels=(16, 32), hidden=64)
    tx = optax.adam(args.lr)

    @jax.jit
    def step(params, state, masks, xb, yb):
        g = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, xb), yb))(params)
        u, state = tx.update(jp.apply_masks(g, masks), state, params)
        return optax.apply_updates(params, jp.project(u, params, masks)), state

    from tqdm.auto import tqdm

    rows = []
    t0 = time.perf_counter()
    bar = tqdm(total=args.seeds * len(args.sparsities) * len(METHODS), desc="pai")
    for seed in range(args.seeds):
        init = model.init(jax.random.key(seed), x[:1])["params"]
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(x), 256, replace=False)
        batch = (x[idx], y[idx])
        for s in args.sparsities:
            for method in METHODS:
                masks = compute(method, model, init, batch, s, seed, args.synflow_rounds)
                params = jp.apply_masks(init, masks)
                state = tx.init(params)
                it = batches(x, y, 64, seed)
                for _ in range(args.steps):
                    xb, yb = next(it)
                    params, state = step(params, state, masks, xb, yb)
                collapsed = pai.collapsed_layers(masks)
                dens = {p: float(m.mean()) for p, m in jp.masks.mask_leaves(masks)}
                rows.append({
                    "method": method, "sparsity": s, "seed": seed,
                    "measured_sparsity": round(jp.total_sparsity(params, masks), 5),
                    "test_acc": accuracy(model.apply, params, xt, yt),
                    "collapsed": ";".join(collapsed),
                    "layer_density": ";".join(f"{p}={d:.4f}" for p, d in dens.items()),
                })
                bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    _common.write_csv(_common.output_path(args, "pai.csv"), rows)
    print(f"\ndigits CNN, masks at init, {args.steps} training steps, {args.seeds} seeds, "
          f"SynFlow {args.synflow_rounds} rounds, {elapsed:.0f}s")
    print(f"{'method':8s} {'sparsity':>8s} {'test acc (mean ± std)':>22s}  collapse (seeds)")
    summary = {}
    for s in args.sparsities:
        for m in METHODS:
            sel = [r for r in rows if r["method"] == m and r["sparsity"] == s]
            a = np.array([r["test_acc"] for r in sel])
            n_col = sum(bool(r["collapsed"]) for r in sel)
            layers = sorted({c for r in sel for c in r["collapsed"].split(";") if c})
            summary[(m, s)] = (float(a.mean()), float(a.std()))
            print(f"{m:8s} {s:8.3f} {100 * a.mean():14.2f} ± {100 * a.std():4.2f}  "
                  f"{n_col}/{len(sel)} {','.join(layers)}")
    plot(summary, args.sparsities, _common.output_path(args, "pai.png"))
    return 0


def plot(summary: dict, sparsities: list[float], path: Path) -> None:
    """Grouped bars: accuracy per method at each sparsity."""
    fig, ax = _common.figure((6.5, 4))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        xs = np.arange(len(sparsities)) + i * width
        ax.bar(xs, [100 * summary[(m, s)][0] for s in sparsities], width,
               yerr=[100 * summary[(m, s)][1] for s in sparsities], capsize=2, label=m)
    ax.set_xticks(np.arange(len(sparsities)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{100 * s:g}%" for s in sparsities])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits CNN: pruning at initialisation")
    ax.legend(fontsize=8)
    _common.save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
