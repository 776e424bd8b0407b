"""Benchmark the N:M (2:4) and block-sparse Pallas matmuls against dense ``jnp.dot`` (bf16).

Shapes: M in {1, 8, 16, 2048} x K, N in {2048, 4096, 8192}; 2:4 vs dense and block-sparse at
50/75/90/95% sparsity vs dense. Each timing is the median of ``--runs`` (>= 20) timed calls after
warm-up, every call under ``jax.jit`` and ``block_until_ready``. Results (with the device name and
which implementation actually ran) go to ``results/bench_kernels.json`` and a printed table with the
sparse/dense time ratio, achieved weight+activation bandwidth and FLOP rate (dense-equivalent FLOPs
``2*M*K*N`` and useful FLOPs).

On CPU the kernels run in Pallas interpret mode: ``--quick`` uses tiny shapes to prove the script
works end to end; those timings are *not* performance numbers and the JSON marks them so.

    python -m experiments.bench_kernels            # full sweep (GPU/TPU)
    python -m experiments.bench_kernels --quick    # tiny shapes, any backend
"""

from __future__ import annotations

import itertools
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.core import patterns
from jaxprune.kernels import _backend, formats
from jaxprune.kernels.block_sparse_matmul import block_sparse_matmul
from jaxprune.kernels.nm_matmul import nm_matmul

from . import _common

FULL_M = (1, 8, 16, 2048)
FULL_KN = (2048, 4096, 8192)
QUICK_M = (1, 8)
QUICK_KN = (64,)
SPARSITIES = (0.5, 0.75, 0.9, 0.95)


def _time(fn: Any, *args: Any, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _row(kind: str, m: int, k: int, n: int, sparsity: float, t: float, t_dense: float,
         w_bytes: int, impl: str, dtype_bytes: int) -> dict[str, Any]:
    io_bytes = w_bytes + (m * k + m * n) * dtype_bytes
    flops = 2.0 * m * k * n
    return {
        "kind": kind, "M": m, "K": k, "N": n, "sparsity": sparsity,
        "time_s": t, "dense_time_s": t_dense, "speedup_vs_dense": t_dense / t,
        "weight_bytes": w_bytes, "bandwidth_GBps": io_bytes / t / 1e9,
        "dense_equiv_TFLOPs": flops / t / 1e12, "useful_TFLOPs": flops * (1 - sparsity) / t / 1e12,
        "impl": impl,
    }


def _check(fn: Any, x: jax.Array, w: Any, dense: jax.Array) -> tuple[str, float]:
    """First call: which implementation ran (a fallback warns) and max |error| vs masked dense."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", RuntimeWarning)
        y = jax.block_until_ready(fn(x, w))
    impl = "reference-fallback" if any("falling back" in str(r.message) for r in rec) else "pallas"
    ref = jnp.dot(x, dense, preferred_element_type=jnp.float32)
    return impl, float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)))


def run(quick: bool, runs: int, warmup: int, out: Path) -> dict[str, Any]:
    """Run the sweep; returns (and writes) the JSON-able result dict."""
    dev = jax.devices()[0]
    interpret = _backend.platform() not in ("gpu", "tpu")
    dtype = jnp.bfloat16
    ms, kns = (QUICK_M, QUICK_KN) if quick else (FULL_M, FULL_KN)
    block = (8, 8) if quick else (128, 128)
    rows: list[dict[str, Any]] = []
    key = jax.random.key(0)
    dense_fn = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
                       .astype(x.dtype))
    nm_fn = jax.jit(nm_matmul)
    bs_fn = jax.jit(block_sparse_matmul)
    for m, k, n in itertools.product(ms, kns, kns):
        kx, kw, key = jax.random.split(key, 3)
        w = jax.random.normal(kw, (k, n), jnp.float32)
        x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
        wd = w.astype(dtype)
        t_dense = _time(dense_fn, x, wd, runs=runs, warmup=warmup)
        rows.append(_row("dense", m, k, n, 0.0, t_dense, t_dense, wd.size * 2, "xla", 2))
        mask = patterns.NM(2, 4).mask(jnp.abs(w), 0.5)
        p = formats.pack_nm(wd, mask, 2, 4)
        impl, err = _check(nm_fn, x, p, jnp.where(mask, wd, 0))
        t = _time(nm_fn, x, p, runs=runs, warmup=warmup)
        rows.append(_row("2:4", m, k, n, 0.5, t, t_dense, p.nbytes(), impl, 2) | {"max_abs_err": err})
        for s in SPARSITIES:
            bm = patterns.Block(*block).mask(jnp.abs(w), s)
            b = formats.pack_block(wd, bm, block)
            impl, err = _check(bs_fn, x, b, jnp.where(bm, wd, 0))
            t = _time(bs_fn, x, b, runs=runs, warmup=warmup)
            rows.append(_row(f"block{block[0]}x{block[1]}", m, k, n, s, t, t_dense, b.nbytes(),
                             impl, 2) | {"max_abs_err": err})
    result = {
        "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
        "jax_version": jax.__version__, "dtype": "bfloat16", "quick": quick,
        "pallas_interpret_mode": interpret,
        "note": ("CPU interpret mode: correctness smoke run only, NOT performance numbers"
                 if interpret else "compiled kernels"),
        "runs": runs, "warmup": warmup, "stat": "median", "rows": rows,
    }
    _common.write_json(out, result)
    return result


def table(result: dict[str, Any]) -> str:
    """Printable table of the result rows."""
    hdr = f"{'kind':<12}{'M':>6}{'K':>6}{'N':>6}{'spars':>6}{'ms':>10}{'x dense':>9}" \
          f"{'GB/s':>9}{'TFLOP/s':>9}  impl"
    lines = [f"device: {result['device']} ({result['platform']}), jax {result['jax_version']}, "
             f"{result['note']}", hdr]
    for r in result["rows"]:
        lines.append(
            f"{r['kind']:<12}{r['M']:>6}{r['K']:>6}{r['N']:>6}{r['sparsity']:>6.2f}"
            f"{1e3 * r['time_s']:>10.3f}{r['speedup_vs_dense']:>9.2f}{r['bandwidth_GBps']:>9.1f}"
            f"{r['dense_equiv_TFLOPs']:>9.2f}  {r['impl']}"
            + (f" err={r['max_abs_err']:.2g}" if "max_abs_err" in r else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point.

    >>> main(["--help"])  # doctest: +SKIP
    """
    ap = _common.parser("jaxprune run bench_kernels", __doc__)
    ap.add_argument("--runs", type=_common.positive_int, default=None,
                    help="timed runs (>= 20; default 20/30)")
    ap.add_argument("--warmup", type=_common.nonnegative_int, default=3)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default <results dir>/bench_kernels.json)")
    args = ap.parse_args(argv)
    runs = args.runs if args.runs is not None else (20 if args.quick else 30)
    if runs < 20:
        ap.error("--runs must be >= 20")
    out = args.out or _common.output_path(args, "bench_kernels.json")
    result = run(args.quick, runs, args.warmup, out)
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
