"""Benchmark: RigL / SET / static train-step time amortised over an update period vs dense.

Each method's jitted train step runs ``periods × update_period`` consecutive steps (so exactly one
mask update per period, both ``lax.cond`` branches compiled beforehand); the wall time per step is
the median over ``repeats`` runs. The target from the issue is ≤ 1.15× dense. Writes JSON.

    jaxprune run bench_dst_overhead            # full (median of 5 runs)
    jaxprune run bench_dst_overhead --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import optax

from jaxprune.training.dst import rigl, set_training, static_sparse
from jaxprune.zoo.loops import cross_entropy
from jaxprune.zoo.models import CNN, MLP

RESULTS = Path(__file__).resolve().parents[1] / "results"


def build(method: str, sparsity: float, period: int) -> optax.GradientTransformation:
    """The optimizer for ``method`` (adam inside)."""
    inner = optax.adam(1e-3)
    if method == "dense":
        return inner
    if method == "static":
        return static_sparse(inner, sparsity=sparsity, allocation="erk")
    fn = rigl if method == "rigl" else set_training
    # end_step far away: every period has exactly one mask update
    return fn(inner, sparsity=sparsity, update_period=period, end_step=10**9)


def time_method(model, params, x, y, method: str, sparsity: float, period: int, periods: int,
                repeats: int) -> list[float]:
    """Seconds per step for each repeat (``periods * period`` steps each)."""
    tx = build(method, sparsity, period)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: cross_entropy(model.apply({"params": q}, x), y))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    p = params
    for _ in range(period + 1):  # compile, and run one mask update
        p, state = step(p, state)
    jax.block_until_ready(p)
    out = []
    n = periods * period
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            p, state = step(p, state)
        jax.block_until_ready((p, state))
        out.append((time.perf_counter() - t0) / n)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table, write ``results/bench_dst_overhead.json``."""
    ap = argparse.ArgumentParser(prog="jaxprune run bench_dst_overhead", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=1, help="multiply the model's widths")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--period", type=int, default=100)
    ap.add_argument("--periods", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.period, args.periods, args.repeats = 4, 1, 2
    w = args.width
    if args.model == "cnn":
        model = CNN(channels=(32 * w, 64 * w), hidden=128 * w)
        x = jax.random.uniform(jax.random.key(0), (args.batch, 8, 8, 1))
    else:
        model = MLP(features=(256 * w, 256 * w, 10))
        x = jax.random.uniform(jax.random.key(0), (args.batch, 64))
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 10)
    params = model.init(jax.random.key(2), x[:1])["params"]
    n_params = sum(int(v.size) for v in jax.tree.leaves(params))
    from tqdm.auto import tqdm

    res = {}
    for method in tqdm(["dense", "static", "set", "rigl"], desc="bench_dst_overhead"):
        times = time_method(model, params, x, y, method, args.sparsity, args.period,
                            args.periods, args.repeats)
        res[method] = {"median_s_per_step": statistics.median(times), "runs_s_per_step": times}
    dense = res["dense"]["median_s_per_step"]
    for v in res.values():
        v["ratio_vs_dense"] = v["median_s_per_step"] / dense
    report = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "n_params": n_params},
        "device": str(jax.devices()[0]), "backend": jax.default_backend(),
        "jax": jax.__version__, "machine": platform.machine(),
        "target_ratio": 1.15, "results": res,
    }
    print(f"\n{args.model} x{w}, batch {args.batch}, {n_params} params, sparsity {args.sparsity}, "
          f"ΔT={args.period}, median of {args.repeats} x {args.periods * args.period} steps, "
          f"{jax.default_backend()}")
    print(f"{'method':8s} {'ms/step':>9s} {'× dense':>8s}")
    for m, v in res.items():
        print(f"{m:8s} {1e3 * v['median_s_per_step']:9.3f} {v['ratio_vs_dense']:8.3f}")
    out = args.out or RESULTS / (
        "bench_dst_overhead_quick.json" if args.quick else "bench_dst_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
