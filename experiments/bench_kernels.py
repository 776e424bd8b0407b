"""Benchmark the N:M (2:4) and block-sparse Pallas matmuls against dense ``jnp.dot`` (bf16).

Shapes: M in {1, 8, 16, 2048} x K, N in {2048, 4096, 8192}; 2:4 vs dense and block-sparse at
50/75/90/95% sparsity vs dense. Each timing is the median of ``--runs`` (>= 20) timed calls after
warm-up, every call under ``jax.jit`` and ``block_until_ready``. Results (with the device name and
which implementation actually ran) go to ``results/bench_kernels.json`` and a printed table with the
sparse/dense time ratio, achieved weight+activation bandwidth and FLOP rate (dense-equivalent FLOPs
``2*M*K*N`` and useful FLOPs). One timed call runs the matmul over 3-8 copies of the weight in
distinct buffers (:func:`time_per_matmul`), so dispatch overhead and the L2 cache do not flatter
small-``M`` timings. ``jaxprune run gpu_check`` reuses :func:`sweep` on LLaMA-7B-shaped layers.

On CPU the kernels run in Pallas interpret mode: ``--quick`` uses tiny shapes to prove the script
works end to end; those timings are *not* performance numbers and the JSON marks them so.

    python -m experiments.bench_kernels            # full sweep (GPU/TPU)
    python -m experiments.bench_kernels --quick    # tiny shapes, any backend
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
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


def copies(w: Any, count: int) -> list[Any]:
    """``count`` copies of a (packed) weight in distinct device buffers (same values).

    Timing one call over several copies defeats the L2 cache (a 2:4 4096x4096 bf16 weight is
    18 MB, an H100's L2 is 50 MB) the way distinct layers of a real model do.

    >>> ws = copies(jnp.ones(3), 2)
    >>> len(ws), ws[0] is ws[1]
    (2, False)
    """
    return [jax.tree.map(lambda a: jnp.array(a, copy=True), w) for _ in range(count)]


def time_per_matmul(fn: Any, x: jax.Array, ws: list[Any], *, runs: int,
                    warmup: int) -> tuple[float, float, jax.Array]:
    """``(median seconds per matmul, seconds of the first call incl. compile, fn(x, ws[0]))``.

    One jitted call runs ``fn(x, w)`` for every ``w`` in ``ws`` (distinct buffers, see
    :func:`copies`), so the per-call dispatch cost (~10 us, more than a decode matmul takes on a
    GPU) is spread over ``len(ws)`` matmuls; the median of ``runs`` calls is divided by it.

    >>> t, _, y = time_per_matmul(jnp.dot, jnp.ones((1, 2)), [jnp.ones((2, 2))] * 2, runs=1,
    ...                           warmup=0)
    >>> t > 0, y.tolist()
    (True, [[2.0, 2.0]])
    """
    many = jax.jit(lambda x, ws: [fn(x, w) for w in ws])
    t0 = time.perf_counter()
    y0 = jax.block_until_ready(many(x, ws))[0]
    first = time.perf_counter() - t0
    return _time(many, x, ws, runs=runs, warmup=warmup) / len(ws), first, y0


def _row(kind: str, m: int, k: int, n: int, sparsity: float, t: float, t_dense: float,
         w_bytes: int, dense_bytes: int, impl: str, dtype_bytes: int) -> dict[str, Any]:
    io_bytes = w_bytes + (m * k + m * n) * dtype_bytes
    flops = 2.0 * m * k * n
    return {
        "kind": kind, "M": m, "K": k, "N": n, "sparsity": sparsity,
        "time_s": t, "dense_time_s": t_dense, "speedup_vs_dense": t_dense / t,
        "weight_bytes": w_bytes, "dense_over_weight_bytes": dense_bytes / w_bytes,
        "bandwidth_GBps": io_bytes / t / 1e9,
        "dense_equiv_TFLOPs": flops / t / 1e12, "useful_TFLOPs": flops * (1 - sparsity) / t / 1e12,
        "impl": impl,
    }


def mask(pattern: Any, w: Any, sparsity: float) -> jax.Array:
    """``pattern.mask(|w|, sparsity)`` under one ``jax.jit`` (eagerly, each op compiles on its own).

    >>> mask(patterns.NM(2, 4), jnp.arange(4.)[:, None], 0.5)[:, 0].tolist()
    [False, False, True, True]
    """
    return jax.jit(lambda a: pattern.mask(jnp.abs(a), sparsity))(jnp.asarray(w))


@jax.jit
def _max_err(y: jax.Array, x: jax.Array, keep: jax.Array, w: jax.Array) -> jax.Array:
    """max |y - x @ where(keep, w, 0)| (f32 accumulation), one compiled program."""
    ref = jnp.dot(x, jnp.where(keep, w, 0), preferred_element_type=jnp.float32)
    return jnp.max(jnp.abs(y.astype(jnp.float32) - ref))


def sweep(layers: Sequence[tuple[int, int]], ms: Sequence[int], *, sparsities: Sequence[float],
          block: tuple[int, int], runs: int, warmup: int, interpret: bool,
          copies_bytes: int = 192 << 20, dtype: Any = jnp.bfloat16,
          on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Dense ``jnp.dot`` vs 2:4 vs block-sparse (each ``sparsities``) for every ``(K, N)`` layer
    and row count ``M``; one dict per timing (see :func:`_row`), passed to ``on_row`` as it comes.

    Each layer is packed once and copied so that one timed call moves >= ``copies_bytes`` of
    dense weights (1..8 copies; 192 MB is 6 copies of 4096x4096 bf16, 3 of 11008x4096). Kernels
    run with ``fallback=False``: a kernel that does not compile raises instead of timing the
    reference.
    """
    impl = "pallas-interpret" if interpret else "pallas-compiled"
    kern = dict(interpret=interpret, fallback=False)
    nm_fn = functools.partial(nm_matmul, **kern)
    bs_fn = functools.partial(block_sparse_matmul, **kern)
    rows: list[dict[str, Any]] = []
    isz = jnp.dtype(dtype).itemsize

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    key = jax.random.key(0)
    for k, n in layers:
        kw, key = jax.random.split(key)
        w = jax.random.normal(kw, (k, n), jnp.float32)
        wd = w.astype(dtype)
        count = max(1, min(8, -(-copies_bytes // (wd.size * isz))))
        dense_bytes = wd.size * isz
        nm_mask = mask(patterns.NM(2, 4), w, 0.5)
        packed = [("2:4", 0.5, nm_fn, formats.pack_nm(wd, nm_mask, 2, 4), nm_mask)]
        for s in sparsities:
            bm = mask(patterns.Block(*block), w, s)
            packed.append((f"block{block[0]}x{block[1]}", s, bs_fn,
                           formats.pack_block(wd, bm, block), bm))
        wds = copies(wd, count)
        sparse_ws = [(kind, s, fn, p, copies(p, count), mk) for kind, s, fn, p, mk in packed]
        for m in ms:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.float32).astype(dtype)
            t_dense, c_dense, _ = time_per_matmul(jnp.dot, x, wds, runs=runs, warmup=warmup)
            emit(_row("dense", m, k, n, 0.0, t_dense, t_dense, dense_bytes, dense_bytes, "xla", isz)
                 | {"copies": count, "first_call_s": c_dense})
            for kind, s, fn, p, ws, msk in sparse_ws:
                t, c, y = time_per_matmul(fn, x, ws, runs=runs, warmup=warmup)
                err = float(_max_err(y, x, msk, wd))
                emit(_row(kind, m, k, n, s, t, t_dense, p.nbytes(), dense_bytes, impl, isz)
                     | {"max_abs_err": err, "copies": count, "first_call_s": c})
    return rows


def run(quick: bool, runs: int, warmup: int, out: Path) -> dict[str, Any]:
    """Run the sweep; returns (and writes) the JSON-able result dict."""
    dev = jax.devices()[0]
    interpret = _backend.platform() not in ("gpu", "tpu")
    ms, kns = (QUICK_M, QUICK_KN) if quick else (FULL_M, FULL_KN)
    rows = sweep(list(itertools.product(kns, kns)), ms, sparsities=SPARSITIES,
                 block=(8, 8) if quick else (128, 128), runs=runs, warmup=warmup,
                 interpret=interpret)
    result = {
        "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
        "jax_version": jax.__version__, "dtype": "bfloat16", "quick": quick,
        "pallas_interpret_mode": interpret,
        "note": ("CPU interpret mode: correctness smoke run only, NOT performance numbers"
                 if interpret else "compiled kernels"),
        "runs": runs, "warmup": warmup, "stat": "median per matmul", "rows": rows,
    }
    _common.write_json(out, result)
    return result


def table(result: dict[str, Any]) -> str:
    """Printable table of the result rows."""
    cols = [("kind", "<12"), ("M", ">6"), ("K", ">6"), ("N", ">6"), ("spars", ">6.2f"), ("ms", ">10.3f"),
            ("x dense", ">9.2f"), ("GB/s", ">9.1f"), ("TFLOP/s", ">9.2f"), ("  impl", "s")]
    rows = [(r["kind"], r["M"], r["K"], r["N"], r["sparsity"], 1e3 * r["time_s"], r["speedup_vs_dense"],
             r["bandwidth_GBps"], r["dense_equiv_TFLOPs"],
             f"  {r['impl']}" + (f" err={r['max_abs_err']:.2g}" if "max_abs_err" in r else ""))
            for r in result["rows"]]
    return (f"device: {result['device']} ({result['platform']}), jax {result['jax_version']}, "
            f"{result['note']}\n" + _common.format_table(cols, rows, sep=""))


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
