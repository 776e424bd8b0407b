"""Train-step overhead of gradual magnitude pruning vs dense Adam on the digits MLP and CNN.

For each model (``MLP`` 64-256-256-10, ``CNN``), Adam, batch 64, this times the jitted train step of
``jaxprune.zoo.loops.make_train_step`` for

* ``dense``: plain ``optax.adam``;
* ``steady``: ``gradual_magnitude(adam, 0.9, ...)`` after its schedule ended (masks fixed; the
  ``lax.cond`` never takes the update branch, the update is projected every step);
* ``window``: a 200-step window inside a long schedule with a mask update every 10 steps;

Every run times one block of steps per variant (``block_until_ready`` at the end), variants
interleaved in a rotating order, so slow phases of a shared machine hit all variants alike. The
report gives medians over runs and the median of per-run ratios to dense (computed within each
run), printed and written as JSON. The primary clock is the process CPU time (XLA:CPU limited to
one intra-op thread by default): on a machine shared with other jobs, wall time varied 2-3x
between identical blocks while CPU time varied ~10%. Wall times are recorded too. One mask
recomputation (all leaves, jitted) is also timed.

Usage::

    .venv/bin/jaxprune run bench_training_overhead            # full (a few minutes on 2 CPUs)
    .venv/bin/jaxprune run bench_training_overhead -- --quick # smoke test
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from jaxprune.core import patterns as pat_lib
from jaxprune.zoo.loops import make_train_step

from . import _common

TARGETS = {"mlp": {"steady": 1.05, "window": 1.5}, "cnn": {"steady": 1.05, "window": 1.10}}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    step: Any
    params: Any
    state: Any


def _time_block(v: Variant, x: jax.Array, y: jax.Array, steps: int) -> tuple[float, float]:
    """``(wall, cpu)`` seconds per step over ``steps`` steps from the variant's start state.

    ``cpu`` is the process CPU time (all threads): on a shared machine it is far more stable
    than wall time, which also counts the time other processes hold the cores.
    """
    p, s = v.params, v.state
    jax.block_until_ready((p, s))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        p, s, _ = v.step(p, s, x, y)
    jax.block_until_ready((p, s))
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def _model(name: str):
    from jaxprune.zoo.models import CNN, MLP

    return {"mlp": MLP(features=(256, 256, 10)), "cnn": CNN()}[name]


def build_variants(model_name: str, x: jax.Array, y: jax.Array, *, freq: int, lr: float,
                   sparsity: float) -> list[Variant]:
    """Dense, steady-state and in-schedule window variants for one model."""
    model = _model(model_name)
    params = model.init(jax.random.key(0), x[:1])["params"]
    variants = []

    def add(name: str, tx: optax.GradientTransformation, state: Any | None = None) -> None:
        step = make_train_step(model.apply, tx)
        variants.append(Variant(name, step, params, tx.init(params) if state is None else state))

    add("dense", optax.adam(lr))
    # steady: run a short schedule to its end, then time with fixed masks
    end = 5 * freq
    tx_s = jp.gradual_magnitude(optax.adam(lr), sparsity, begin=0, end=end, freq=freq)
    step_s = make_train_step(model.apply, tx_s)
    p, s = params, tx_s.init(params)
    for _ in range(end + 2):
        p, s, _ = step_s(p, s, x, y)
    assert float(jp.total_sparsity(p, jp.get_masks(s))) > sparsity - 0.01
    variants.append(Variant("steady", step_s, p, s))
    # window: mid-schedule (long schedule, start at a grid step so updates hit every `freq`)
    long_end = 100_000
    start = 10 * freq

    def window_state(tx):
        st = tx.init(params)
        return st._replace(count=jnp.asarray(start, jnp.int32))

    tx_w = jp.gradual_magnitude(optax.adam(lr), sparsity, begin=0, end=long_end, freq=freq)
    add("window", tx_w, window_state(tx_w))
    return variants


def profile_mask_update(model_name: str, x: jax.Array, reps: int) -> dict[str, Any]:
    """Milliseconds for one jitted mask recomputation (all leaves, unstructured top-k)."""
    model = _model(model_name)
    params = model.init(jax.random.key(0), x[:1])["params"]
    masks = jp.init_masks(params)
    out: dict[str, Any] = {}
    for name, pat in (("core", pat_lib.Unstructured()),):
        f = jax.jit(lambda p, s, pat=pat: jp.compute_masks(
            masks, jp.criteria.magnitude(p, masks), s, "uniform", pat))
        jax.block_until_ready(f(params, 0.5))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(10):
                r = f(params, 0.5)
            jax.block_until_ready(r)
            ts.append((time.perf_counter() - t0) / 10 * 1e3)
        out[name] = round(float(np.median(ts)), 4)
    out["leaves"] = {path: int(np.prod(m.shape)) for path, m in jp.masks.mask_leaves(masks)}
    return out


def bench_model(model_name: str, *, runs: int, steps: int, freq: int,
                profile: bool, lr: float = 1e-3, sparsity: float = 0.9) -> dict[str, Any]:
    from jaxprune.zoo.data import load_digits

    xs, ys = load_digits("train", source="sklearn")
    x, y = jnp.asarray(xs[:64]), jnp.asarray(ys[:64])
    variants = build_variants(model_name, x, y, freq=freq, lr=lr, sparsity=sparsity)
    for v in variants:  # compile + warm caches
        _time_block(v, x, y, 2)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    walls: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(runs):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:  # rotate the order run by run
            wall, cpu = _time_block(v, x, y, steps)
            times[v.name].append(cpu)
            walls[v.name].append(wall)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    dense = np.asarray(times["dense"])
    paired = {k: float(np.median(np.asarray(v) / dense)) for k, v in times.items() if k != "dense"}
    wmed = {k: float(np.median(v)) * 1e3 for k, v in walls.items()}
    wdense = np.asarray(walls["dense"])
    res: dict[str, Any] = {
        "clock": "process CPU time per step (primary); wall time below for reference",
        "median_ms_per_step": {k: round(v, 4) for k, v in med.items()},
        "ratio_of_medians": {k: round(med[k] / med["dense"], 3) for k in med if k != "dense"},
        "ratio_of_minimums": {k: round(min(times[k]) / min(times["dense"]), 3)
                              for k in times if k != "dense"},
        "median_paired_ratio": {k: round(v, 3) for k, v in paired.items()},
        "runs_ms_per_step": {k: [round(t * 1e3, 4) for t in v] for k, v in times.items()},
        "wall_median_ms_per_step": {k: round(v, 4) for k, v in wmed.items()},
        "wall_median_paired_ratio": {
            k: round(float(np.median(np.asarray(v) / wdense)), 3)
            for k, v in walls.items() if k != "dense"
        },
        "wall_runs_ms_per_step": {k: [round(t * 1e3, 4) for t in v] for k, v in walls.items()},
        "targets": TARGETS[model_name],
        "meets_target": {
            k: paired[k] <= TARGETS[model_name]["steady" if k == "steady" else "window"]
            for k in paired
        },
    }
    if profile:
        res["mask_update_ms"] = profile_mask_update(model_name, x, reps=max(3, runs))
    return res


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: ms/step (median) and median paired ratio to dense, per model and variant."""
    names = ["dense", "steady", "window"]
    head = ["model", *names]
    rows = []
    for m, r in results.items():
        cells = [m]
        for n in names:
            if n not in r["median_ms_per_step"]:
                cells.append("-")
                continue
            ms = r["median_ms_per_step"][n]
            if n == "dense":
                cells.append(f"{ms:.3f} ms")
            else:
                ratio = r["median_paired_ratio"][n]
                tgt = r["targets"]["steady" if n == "steady" else "window"]
                mark = "ok" if ratio <= tgt else "over"
                cells.append(f"{ms:.3f} ms ({ratio:.2f}x, target {tgt:.2f}x {mark})")
        rows.append(cells)
    w = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    line = lambda c: "| " + " | ".join(s.ljust(k) for s, k in zip(c, w, strict=True)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (k + 2) for k in w) + "|",
                      *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON. Returns 0 (timings never fail it)."""
    ap = _common.parser("jaxprune run bench_training_overhead", __doc__)
    ap.add_argument("--models", default="mlp,cnn", help="comma list of mlp, cnn (default both)")
    ap.add_argument("--runs", type=_common.positive_int, default=7,
                    help="timed runs per variant (default 7, >= 5)")
    ap.add_argument("--steps", type=_common.positive_int, default=200,
                    help="steps per timed block (default 200)")
    ap.add_argument("--freq", type=_common.positive_int, default=10,
                    help="mask update every N steps (default 10)")
    ap.add_argument("--no-profile", action="store_true", help="skip the mask-update profile")
    ap.add_argument("--threads", type=_common.nonnegative_int, default=1,
                    help="XLA:CPU intra-op threads (default 1: stable timings on a shared "
                         "machine; 0 leaves XLA's default). Applied only before JAX starts.")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default <results dir>/bench_training_overhead.json)")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in TARGETS]
    if bad:
        ap.error(f"unknown model(s) {bad}; valid: {sorted(TARGETS)}")
    runs, steps = (2, 20) if args.quick else (args.runs, args.steps)
    threads_applied = _common.set_xla_threads(args.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    results = {}
    for m in models:
        results[m] = bench_model(m, runs=runs, steps=steps, freq=args.freq,
                                 profile=not args.no_profile)
        print(f"{m}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = format_table(results)
    print(table)
    for m, r in results.items():
        if "mask_update_ms" in r:
            mu = r["mask_update_ms"]
            print(f"{m}: one mask recomputation (all leaves, jitted): {mu['core']:.3f} ms")
    report = {
        "config": {"runs": runs, "steps_per_block": steps, "mask_update_every": args.freq,
                   "batch_size": 64, "optimizer": "adam(1e-3)", "sparsity": 0.9},
        "environment": {
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "xla_cpu_threads": args.threads if threads_applied else "default",
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "loadavg_start": [round(v, 2) for v in load0],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "results": results,
        "table_markdown": table,
    }
    out = _common.write_json(args.out or _common.output_path(args, "bench_training_overhead.json"),
                             report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
