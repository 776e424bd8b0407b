"""Measured CPU inference speedup of structurally slimmed models vs the originals (JSON out).

Models: the digits CNN widened (channels 64/128, hidden 256) and the toy GPT (4 layers, d=128);
for each removal ratio the groups are discovered by tracing, units chosen by L2 norm, the model
slimmed, and the jitted forward pass timed (median of ``--repeats`` runs of ``--iters`` calls).

    python -m experiments.bench_structured            # results/bench_structured.json
    python -m experiments.bench_structured --quick
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from . import _common


def median_time(fn: Callable[[], Any], iters: int = 20, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean seconds per call of ``fn`` (after one warm-up call)."""
    jax.block_until_ready(fn())
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / iters)
    return statistics.median(runs)


def _slim_rows(name: str, model: Any, v: Any, groups: list, rebuild: Any, x: Any, ratios: list[float],
               iters: int, repeats: int) -> list[dict]:
    """Time ``model`` against its slimmed copy (units chosen by L2 norm) at each ratio."""
    from jaxprune.structured import choose_units, group_scores, param_count
    from jaxprune.structured import slim as do_slim

    f0 = jax.jit(model.apply)
    t0 = median_time(lambda: f0(v, x), iters, repeats)
    rows = []
    for r in ratios:
        sel = choose_units(group_scores(v, groups, "l2"), groups, r)
        sv = do_slim(v, groups, sel.keep)
        f1 = jax.jit(rebuild(sv).apply)
        t1 = median_time(lambda f1=f1, sv=sv: f1(sv, x), iters, repeats)
        rows.append({"model": name, "ratio": r, "params": param_count(v),
                     "params_slim": param_count(sv), "ms": t0 * 1e3, "ms_slim": t1 * 1e3,
                     "speedup": t0 / t1, "batch": x.shape[0]})
    return rows


def bench_cnn(ratios: list[float], batch: int, iters: int, repeats: int) -> list[dict]:
    """CNN rows: params and time of original vs slim for each ratio of conv channels removed."""
    from jaxprune.structured import discover_groups
    from jaxprune.zoo.models import CNN, rebuild_small

    model = CNN(channels=(64, 128), hidden=256)
    x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 1))
    v = model.init(jax.random.key(1), x[:1])
    groups = [g for g in discover_groups(model.apply, v, x[:1])
              if g.members[0].path.startswith("params/Conv")]
    return _slim_rows("cnn64-128", model, v, groups, lambda sv: rebuild_small(model, sv["params"]),
                      x, ratios, iters, repeats)


def bench_gpt(ratios: list[float], batch: int, iters: int, repeats: int) -> list[dict]:
    """Toy GPT rows: heads + FFN units removed by L2 norm."""
    from jaxprune.structured import discover_groups
    from jaxprune.zoo.models.toy_transformer import ToyConfig, ToyGPT, config_from_params

    cfg = ToyConfig(vocab=256, d_model=128, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=16,
                    d_ff=512, max_len=128)
    model = ToyGPT(cfg)
    x = jax.random.randint(jax.random.key(0), (batch, 128), 0, 256)
    v = model.init(jax.random.key(1), x[:1])
    groups = head_ffn_groups(discover_groups(model.apply, v, x[:1]))
    return _slim_rows("gpt-d128-L4", model, v, groups,
                      lambda sv: ToyGPT(config_from_params(cfg, sv["params"])), x, ratios, iters, repeats)


def head_ffn_groups(groups: list) -> list:
    """Attention-head groups (the non-innermost factor on the ``o`` kernel's input axis) and FFN
    unit groups (``down`` kernel input axis); exact groups only."""
    out = []
    for g in groups:
        if not g.exact:
            continue
        for m in g.members:
            if m.path.endswith("attn/o/kernel") and m.axis == 0 and m.pos < len(m.sizes) - 1:
                out.append(g)
                break
            if m.path.endswith("ffn/down/kernel") and m.axis == 0:
                out.append(g)
                break
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table, write ``results/bench_structured.json``."""
    ap = _common.parser("jaxprune run bench_structured", __doc__)
    ap.add_argument("--ratios", type=_common.unit_fraction, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default <results dir>/bench_structured.json)")
    a = ap.parse_args(argv)
    out = a.out or _common.output_path(a, "bench_structured.json")
    iters, repeats = (5, 3) if a.quick else (20, 7)
    from tqdm.auto import tqdm

    rows = []
    for fn, batch in tqdm([(bench_cnn, 256 if a.quick else 1024), (bench_gpt, 4 if a.quick else 16)],
                          desc="bench"):
        rows += fn(a.ratios, batch, iters, repeats)
    print(_common.format_table(
        [("model", "<12"), ("ratio", ">5.2f"), ("params", ">9d"), ("slim", ">9d"), ("ms", ">8.2f"),
         ("ms slim", ">8.2f"), ("speedup", ">7.2f")],
        [(r["model"], r["ratio"], r["params"], r["params_slim"], r["ms"], r["ms_slim"], r["speedup"])
         for r in rows]))
    meta = {"device": str(jax.devices()[0]), "jax": jax.__version__, "iters": iters,
            "repeats": repeats, "quick": a.quick, "note": "median of repeats; CPU shared machine"}
    _common.write_json(out, {"meta": meta, "rows": rows})
    print(f"wrote {out}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
