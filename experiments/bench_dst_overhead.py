"""Benchmark: RigL / SET / static train-step time amortised over an update period vs dense.

Each method's jitted train step runs ``periods × update_period`` consecutive steps per run (so
exactly one mask update per period; both ``lax.cond`` branches compiled beforehand). Runs are
interleaved across methods in a rotating order, so slow phases of a shared machine hit all methods
alike; the primary clock is the process CPU time (XLA:CPU on one intra-op thread by default), and
the reported ratio is the median over runs of (method / dense in the same run). Wall times are in
the JSON too. The target from the issue is ≤ 1.15× dense (SET on the digits MLP). ``set_host`` /
``rigl_host`` are the same transforms with the loop passing ``mask_update=(i % period == 0)`` as a
static argument (no ``lax.cond`` on the steps without an update). Writes JSON.

    jaxprune run bench_dst_overhead                 # digits CNN (median of 7 runs)
    jaxprune run bench_dst_overhead --model mlp     # digits MLP 64-256-256-10
    jaxprune run bench_dst_overhead --model mlp --depth 12   # 12 hidden layers of 256
    jaxprune run bench_dst_overhead --quick         # smoke test
    jaxprune run bench_dst_overhead --model mlp --breakdown   # + SET without / with every-step
                                                              # updates, + a trivial update branch
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import optax

from jaxprune.training.dst import rigl, set_training, sparse_init, static_sparse
from jaxprune.training.wrapper import masked
from jaxprune.zoo.loops import cross_entropy
from jaxprune.zoo.models import CNN, MLP

from . import _common

METHODS = ("dense", "static", "set", "rigl", "set_host", "rigl_host")
# *_host: the same transform, the training loop telling it on the host which steps update masks
# (tx.update(..., mask_update=i % period == 0) as a static argument: two compiled programs)
# --breakdown: where SET's cost goes (the same step with its mask update never taken / every step,
# and SET's step structure with a trivial mask update in the cond's branch instead of drop/grow)
BREAKDOWN = ("set_no_update", "set_every_step", "cond_trivial")


def build(method: str, sparsity: float, period: int) -> optax.GradientTransformation:
    """The optimizer for ``method`` (adam inside)."""
    inner = optax.adam(1e-3)
    if method == "dense":
        return inner
    if method == "static":
        return static_sparse(inner, sparsity)
    if method == "set_no_update":  # the lax.cond is there, its update branch is never taken
        return set_training(inner, sparsity, update_period=period, end_step=1)
    if method == "set_every_step":
        return set_training(inner, sparsity, update_period=1, end_step=10**9)
    if method == "cond_trivial":  # SET's wrapper and cond, but the branch keeps the masks as they are
        return masked(
            inner, method="cond_trivial", mask_grads=True, restart_grown=True,
            init_masks=lambda p: sparse_init(p, sparsity),
            update_masks=lambda u: (u.masks, jax.tree.map(lambda m: m & False, u.masks)),
            should_update=lambda c: (c > 0) & (c % period == 0))
    method = method.removesuffix("_host")
    fn = rigl if method == "rigl" else set_training
    # end_step far away: every period has exactly one mask update
    return fn(inner, sparsity, update_period=period, end_step=10**9)


class Runner:
    """One method's jitted step and its running ``(params, state)``."""

    def __init__(self, model, params, x, y, method: str, sparsity: float, period: int):
        tx = build(method, sparsity, period)
        host = method.endswith("_host")

        @functools.partial(jax.jit, static_argnames="hint")
        def step(p, s, hint=None):
            g = jax.grad(lambda q: cross_entropy(model.apply({"params": q}, x), y))(p)
            u, s = tx.update(g, s, p, mask_update=hint)
            return optax.apply_updates(p, u), s

        self.step, self.p, self.state = step, params, tx.init(params)
        self.hint = (lambda i: i % period == 0) if host else (lambda i: None)
        self.i = 0
        for _ in range(period):  # compile, and run up to the step before an update
            self.p, self.state = step(self.p, self.state, self.hint(self.i))
            self.i += 1
        jax.block_until_ready((self.p, self.state))

    def run(self, n: int) -> tuple[float, float]:
        """``(cpu, wall)`` seconds per step over ``n`` steps."""
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            self.p, self.state = self.step(self.p, self.state, self.hint(self.i))
            self.i += 1
        jax.block_until_ready((self.p, self.state))
        return (time.process_time() - c0) / n, (time.perf_counter() - t0) / n


def bench(model, params, x, y, *, sparsity: float, period: int, periods: int,
          repeats: int, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Interleaved runs of every method; medians and median paired ratios to dense."""
    from tqdm.auto import tqdm

    runners = {m: Runner(model, params, x, y, m, sparsity, period)
               for m in tqdm(methods, desc="compile")}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    for r in tqdm(range(repeats), desc="bench_dst_overhead"):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:  # rotate the order run by run
            c, w = runners[m].run(periods * period)
            cpu[m].append(c)
            wall[m].append(w)
    res: dict[str, Any] = {}
    for m in methods:
        res[m] = {
            "median_cpu_s_per_step": statistics.median(cpu[m]),
            "median_paired_ratio": statistics.median(
                a / b for a, b in zip(cpu[m], cpu["dense"], strict=True)),
            "median_wall_s_per_step": statistics.median(wall[m]),
            "wall_median_paired_ratio": statistics.median(
                a / b for a, b in zip(wall[m], wall["dense"], strict=True)),
            "runs_cpu_s_per_step": cpu[m],
            "runs_wall_s_per_step": wall[m],
        }
    return res


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table, write ``results/bench_dst_overhead.json``."""
    ap = _common.parser("jaxprune run bench_dst_overhead", __doc__)
    ap.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=1, help="multiply the model's widths")
    ap.add_argument("--depth", type=_common.positive_int, default=2,
                    help="MLP: hidden layers of 256 x width units (default 2)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--period", type=int, default=100)
    ap.add_argument("--periods", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="XLA:CPU intra-op threads (default 1: stable timings on a shared machine; "
                         "0 leaves XLA's default). Applied only before JAX starts.")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time SET with its mask update never taken and taken every step, "
                         "and SET's cond with a trivial branch (masks kept) instead of drop/grow")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.period, args.periods, args.repeats = 4, 1, 2
    threads_applied = _common.set_xla_threads(args.threads)
    load0 = os.getloadavg()
    w = args.width
    if args.model == "cnn":
        model = CNN(channels=(32 * w, 64 * w), hidden=128 * w)
        x = jax.random.uniform(jax.random.key(0), (args.batch, 8, 8, 1))
    else:
        model = MLP(features=(256 * w,) * args.depth + (10,))
        x = jax.random.uniform(jax.random.key(0), (args.batch, 64))
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 10)
    params = model.init(jax.random.key(2), x[:1])["params"]
    n_params = sum(int(v.size) for v in jax.tree.leaves(params))
    res = bench(model, params, x, y, sparsity=args.sparsity, period=args.period,
                periods=args.periods, repeats=args.repeats,
                methods=METHODS + (BREAKDOWN if args.breakdown else ()))
    report = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "n_params": n_params},
        "clock": "process CPU time per step (primary); wall time for reference",
        "device": str(jax.devices()[0]), "backend": jax.default_backend(),
        "jax": jax.__version__, "machine": platform.machine(),
        "xla_cpu_threads": args.threads if threads_applied else "default",
        "loadavg_start": [round(v, 2) for v in load0],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "target_ratio": 1.15, "results": res,
    }
    depth = f" depth {args.depth}" if args.model == "mlp" else ""
    print(f"\n{args.model} x{w}{depth}, batch {args.batch}, {n_params} params, sparsity {args.sparsity}, "
          f"ΔT={args.period}, {args.repeats} interleaved runs x {args.periods * args.period} steps, "
          f"{jax.default_backend()}, load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'method':14s} {'cpu ms/step':>12s} {'× dense':>8s} {'wall × dense':>13s}")
    for m, v in res.items():
        print(f"{m:14s} {1e3 * v['median_cpu_s_per_step']:12.3f} {v['median_paired_ratio']:8.3f} "
              f"{v['wall_median_paired_ratio']:13.3f}")
    name = f"bench_dst_overhead{'' if args.model == 'cnn' else '_' + args.model}"
    name += f"_depth{args.depth}.json" if args.model == "mlp" and args.depth != 2 else ".json"
    out = _common.write_json(args.out or _common.output_path(args, name), report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
