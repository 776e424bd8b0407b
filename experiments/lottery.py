"""Lottery tickets on digits MLP: IMP rewinding to init / early step vs random re-init vs one-shot.

Iterative magnitude pruning (``jaxprune.training.lottery.imp``) removes ``--fraction`` of the remaining
weights per round down to ~98% sparsity (``imp(sparsity=1 - (1 - fraction)^rounds, rounds=...)``).
Compared at every round's sparsity:

* IMP, rewind to init (Frankle & Carbin 2019);
* IMP, late rewinding to step ``k`` (Frankle et al. 2020), the rewind point kept in the optimizer
  state by ``keep_rewind_point``;
* IMP, learning-rate rewinding (Renda et al. 2020): survivors keep their trained values;
* random re-init: the IMP-rewind-to-init masks trained from a fresh random init;
* one-shot: prune the dense-trained net to the same sparsity in one step, rewind to init, retrain.

    jaxprune run lottery            # full run (a few CPU minutes)
    jaxprune run lottery --quick    # smoke test
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxprune as jp
from jaxprune.training import lottery as lt
from jaxprune.zoo.data import load_digits
from jaxprune.zoo.loops import accuracy, batches, cross_entropy
from jaxprune.zoo.models import MLP

from . import _common

VARIANTS = ["IMP rewind to init", "IMP rewind to step k", "IMP LR rewinding", "random re-init",
            "one-shot + rewind to init"]


def make_trainer(model: MLP, x: np.ndarray, y: np.ndarray, steps: int, lr: float, k: int,
                 seed: int):
    """``train(params, masks) -> Trained``: adam with a warm-up-free cosine LR, fixed mask.

    One jitted step for every round (masks are an argument, so nothing recompiles); updates go
    through :func:`jaxprune.project` so params stay exactly zero off-mask; the optimizer is wrapped
    in :func:`keep_rewind_point` so the dense run records step ``k``.
    """
    tx = lt.keep_rewind_point(optax.adam(optax.cosine_decay_schedule(lr, steps)), k)

    @jax.jit
    def step(params, state, masks, xb, yb):
        def loss(p):
            return cross_entropy(model.apply({"params": p}, xb), yb)

        g = jp.apply_masks(jax.grad(loss)(params), masks)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, jp.project(u, params, masks)), state

    def train(params, masks):
        params = jp.apply_masks(params, masks)
        state = tx.init(params)
        it = batches(x, y, 64, seed)
        for _ in range(steps):
            xb, yb = next(it)
            params, state = step(params, state, masks, xb, yb)
        return lt.Trained(params, state)

    return train


def main(argv: list[str] | None = None) -> int:
    """Run the study; write ``results/lottery.csv`` and ``.png``; print a table."""
    ap = _common.parser("jaxprune run lottery", __doc__, steps=400, seeds=2, lr=3e-3)
    ap.add_argument("--rounds", type=_common.positive_int, default=8)
    ap.add_argument("--fraction", type=_common.unit_fraction, default=0.4,
                    help="fraction of the remaining weights pruned per round (default 0.4)")
    ap.add_argument("--rewind-step", type=_common.nonnegative_int, default=20)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.seeds, args.rewind_step = 12, 2, 1, 3
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    model = MLP(features=(128, 64, 10))
    from tqdm.auto import tqdm

    rows: list[dict] = []
    t0 = time.perf_counter()
    total = args.seeds * (3 * (args.rounds + 1) + 2 * args.rounds)
    bar = tqdm(total=total, desc="lottery")

    def record(variant, seed, r, masks, params):
        acc = accuracy(model.apply, params, xt, yt)
        rows.append({"variant": variant, "seed": seed, "round": r,
                     "sparsity": round(jp.total_sparsity(params, masks), 4), "test_acc": acc})
        bar.update(1)

    for seed in range(args.seeds):
        init = model.init(jax.random.key(seed), x[:1])["params"]
        train = make_trainer(model, x, y, args.steps, args.lr, args.rewind_step, seed)
        res = {}
        final = 1.0 - (1.0 - args.fraction) ** args.rounds
        for variant, rewind_to in zip(VARIANTS[:3], ["init", args.rewind_step, "lr"],
                                      strict=True):
            res[variant] = lt.imp(
                init, train, sparsity=final, rounds=args.rounds, rewind_to=rewind_to,
                callback=lambda r, v=variant, s=seed: record(v, s, r.round, r.masks, r.trained),
            )
        base = res[VARIANTS[0]]
        dense_trained = base.rounds[0].trained
        reinit = model.init(jax.random.key(10_000 + seed), x[:1])["params"]
        full = jp.init_masks(init)
        for rnd in base.rounds[1:]:
            p = train(reinit, rnd.masks).params
            record(VARIANTS[3], seed, rnd.round, rnd.masks, p)
            m1 = lt.imp_masks(dense_trained, full, lt.imp_sparsity(final, rnd.round,
                                                                    args.rounds))
            p = train(lt.rewind(init, m1), m1).params
            record(VARIANTS[4], seed, rnd.round, m1, p)
    bar.close()
    elapsed = time.perf_counter() - t0
    _common.write_csv(_common.output_path(args, "lottery.csv"), rows)
    table = {}
    for v in VARIANTS:
        for r in range(args.rounds + 1):
            sel = [row for row in rows if row["variant"] == v and row["round"] == r]
            if sel:
                a = np.array([row["test_acc"] for row in sel])
                table[(v, r)] = (sel[0]["sparsity"], float(a.mean()), float(a.std()))
    print(f"\ndigits MLP 64-128-64-10, {args.steps} steps/round, fraction {args.fraction}, "
          f"rewind step k={args.rewind_step}, {args.seeds} seeds, {elapsed:.0f}s")
    rounds = list(range(args.rounds + 1))
    print("sparsity".ljust(28) + "".join(f"{table[(VARIANTS[0], r)][0]:>9.3f}" for r in rounds))
    for v in VARIANTS:
        print(v.ljust(28) + "".join(
            f"{100 * table[(v, r)][1]:>9.2f}" if (v, r) in table else f"{'-':>9s}"
            for r in rounds))
    plot(table, VARIANTS, rounds, _common.output_path(args, "lottery.png"))
    return 0


def plot(table: dict, variants: list[str], rounds: list[int], path: Path) -> None:
    """Test accuracy vs remaining weights (log x), error bars = std over seeds."""
    series = {}
    for v in variants:
        pts = [table[(v, r)] for r in rounds if (v, r) in table]
        series[v] = ([100 * (1 - s) for s, _, _ in pts], [100 * m for _, m, _ in pts],
                     [100 * sd for _, _, sd in pts])
    _common.errorbar_plot(path, series, xlabel="weights remaining (%)", ylabel="test accuracy (%)",
                          title="digits MLP: lottery tickets", xscale="log", invert_x=True,
                          figsize=(6.5, 4))


if __name__ == "__main__":
    raise SystemExit(main())
