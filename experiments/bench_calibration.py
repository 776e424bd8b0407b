"""Calibration and sequential-pruning cost: wall time per call cold (with compilation) and warm,
and the number of compilations, on a small linen MLP, an nnx MLP and all-MiniLM-L6-v2; then MiniLM
sequential SparseGPT 50% (6 blocks x 6 linears, 128 variable-length sentences, each its own sequence:
packed into rows of one length with segment ids, or with ``--no-pack`` length buckets with a token
mask) in a fresh process: wall time including compilation, compile time and compilations.

The reference PyTorch SparseGPT prunes MiniLM by the same protocol in 5.6 s on the 2-core CPU of
issue 12. Times depend on the machine and on its load: the load average is recorded with them.
Writes ``results/bench_calibration.json``.

    jaxprune run bench_calibration [--quick] [--skip-minilm] [--no-pack]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from . import _common


def _timed_calls(fn: Any, n: int = 3) -> dict[str, Any]:
    """Cold call (compiles) then ``n - 1`` warm calls: seconds and compilations of each."""
    out: dict[str, Any] = {}
    for i in range(n):
        with _common.compile_stats() as c:
            t0 = time.perf_counter()
            fn()
            secs = time.perf_counter() - t0
        key = "cold" if i == 0 else f"warm{i}"
        out[key] = {"seconds": round(secs, 4), **c.as_dict()}
    return out


def _calibration_cases(quick: bool, minilm: bool, n_sent: int, pack: bool) -> list[dict[str, Any]]:
    import jax
    from flax import nnx

    from jaxprune.oneshot import calibrate
    from jaxprune.zoo.models.small import MLP, NnxMLP

    rows = []
    xs = [jax.random.normal(jax.random.key(i), (64, 64)) for i in range(4)]
    mlp = MLP()
    p = mlp.init(jax.random.key(0), xs[0])["params"]
    rows.append({"model": "linen MLP 64-256-256-10", "batches": "4 x (64, 64)",
                 **_timed_calls(lambda: calibrate(mlp, p, xs))})
    net = NnxMLP(64, rngs=nnx.Rngs(0))
    rows.append({"model": "nnx MLP 64-256-256-10", "batches": "4 x (64, 64)",
                 **_timed_calls(lambda: calibrate(net, None, xs))})
    if minilm and not quick:
        from jaxprune.zoo.data.text_tfds import stdlib_sentences
        from jaxprune.zoo.models import bert

        model, params, tok = bert.load_minilm()
        calib = bert.calibration_batches(tok, stdlib_sentences(n_sent, "train"), batch=32, pack=pack)
        masks = [m for _, m in calib]
        shapes = sorted({tuple(int(d) for d in x.shape) for x, _ in calib})
        ntok = int(sum((m > 0).sum() for m in masks))
        rows.append({"model": "MiniLM-L6 (whole model)",
                     "batches": f"{len(calib)} batches, shapes {shapes}, {ntok} tokens",
                     **_timed_calls(lambda: calibrate(model, params, calib, token_masks=masks), 2)})
    return rows


def minilm_sequential(n_sent: int, batch: int, pack: bool = True) -> dict[str, Any]:
    """MiniLM sequential SparseGPT 50% in this process (run it in a fresh one): seconds, compiles."""
    t_start = time.perf_counter()
    cpu0 = time.process_time()
    import jax

    from jaxprune.oneshot import get_method, prune_sequential
    from jaxprune.zoo.data.text_tfds import stdlib_sentences
    from jaxprune.zoo.models import bert

    t_import = time.perf_counter()
    model, params, tok = bert.load_minilm()
    calib = bert.calibration_batches(tok, stdlib_sentences(n_sent, "train"), batch=batch, pack=pack)
    masks = [m for _, m in calib]
    jax.block_until_ready(params)
    t_load = time.perf_counter()
    cpu1 = time.process_time()
    with _common.compile_stats() as c:
        pruned, pmasks = prune_sequential(params, bert.blocks(model.cfg), calib, get_method("sparsegpt"),
                                          0.5, token_masks=masks, progress=False)
        jax.block_until_ready(pruned)
    t_end = time.perf_counter()
    n_pruned = sum(m is not None for m in jax.tree.leaves(pmasks, is_leaf=lambda x: x is None))
    return {
        "sentences": n_sent, "batch": batch, "packed": pack,
        "tokens": int(sum((m > 0).sum() for m in masks)),
        "padded_tokens": int(sum(m.size for m in masks)),
        "shapes": sorted({tuple(int(d) for d in x.shape) for x, _ in calib}),
        "pruned_layers": n_pruned,
        "import_s": round(t_import - t_start, 2), "load_s": round(t_load - t_import, 2),
        "prune_s": round(t_end - t_load, 2), "prune_cpu_s": round(time.process_time() - cpu1, 2),
        "setup_cpu_s": round(cpu1 - cpu0, 2), **c.as_dict(),
        "prune_minus_compile_s": round(t_end - t_load - c.total_s, 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table."""
    ap = _common.parser("jaxprune run bench_calibration", __doc__)
    ap.add_argument("--sentences", type=_common.positive_int, default=128)
    ap.add_argument("--batch", type=_common.positive_int, default=32,
                    help="rows per calibration batch (unpacked: sentences; 1 = one per batch)")
    ap.add_argument("--no-pack", action="store_true",
                    help="length buckets (one sentence a row) instead of packed rows")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse_hidden())
    args = ap.parse_args(argv)
    if args.child:  # the fresh process of the sequential run
        print(json.dumps(minilm_sequential(args.sentences, args.batch, not args.no_pack)))
        return 0
    out: dict[str, Any] = {"loadavg_1min_start": round(os.getloadavg()[0], 2),
                           "calibrate": _calibration_cases(args.quick, not args.skip_minilm, args.sentences,
                                                           not args.no_pack)}
    if not (args.quick or args.skip_minilm):
        cmd = [sys.executable, "-m", __spec__.name if __spec__ else "jaxprune_experiments.bench_calibration",
               "--child", "--sentences", str(args.sentences), "--batch", str(args.batch)]
        if args.no_pack:
            cmd.append("--no-pack")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out["minilm_sequential_sparsegpt50"] = json.loads(res.stdout.strip().splitlines()[-1])
    _common.write_json(_common.output_path(args, "bench_calibration.json"), out)
    print(f"load average at start: {out['loadavg_1min_start']} (times are inflated on a busy machine)")
    print(_common.format_table(
        [("calibrate", "28s"), ("cold s", "8.2f"), ("compiles", "8d"), ("compile s", "9.2f"),
         ("warm s", "8.2f"), ("compiles", "8d")],
        [(r["model"], r["cold"]["seconds"], r["cold"]["compiles"], r["cold"]["total_compile_s"],
          r["warm1"]["seconds"], r["warm1"]["compiles"]) for r in out["calibrate"]]))
    if "minilm_sequential_sparsegpt50" in out:
        s = out["minilm_sequential_sparsegpt50"]
        print(f"MiniLM sequential SparseGPT 50% ({s['sentences']} sentences, {s['tokens']} tokens in "
              f"{s['padded_tokens']} positions, {'packed' if s['packed'] else 'length buckets'}, "
              f"shapes {s['shapes']}, {s['pruned_layers']} layers), fresh process:")
        print(f"  prune_sequential {s['prune_s']:.2f} s wall ({s['prune_cpu_s']:.2f} s CPU), of which "
              f"compile {s['total_compile_s']:.2f} s in {s['compiles']} compilations; "
              f"import {s['import_s']:.1f} s, load {s['load_s']:.1f} s; load average {s['loadavg_1min']}")
    return 0


def argparse_hidden() -> str:
    """Help text of the internal ``--child`` flag."""
    return "internal: run the MiniLM sequential measurement in this (fresh) process and print JSON"


if __name__ == "__main__":
    raise SystemExit(main())
