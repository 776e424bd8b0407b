"""One prepared GPU check (``make gpu-check``): kernels compiled on the GPU, the kernel benchmark,
SparseGPT per LLaMA-7B layer and a sparse training step, in at most ~8 minutes.

Sections (each timed, capped and guarded: one that fails or runs out of time is reported and the
others still run; the JSON is rewritten after every section, so a run cut short keeps what it did):

* ``kernels`` -- 2:4 and block-sparse Pallas kernels *compiled* (not interpreted) vs the ``jnp``
  reference, f32 and bf16, the default ``impl="auto"`` path with ``fallback=False`` and one
  gradient through the ``custom_vjp``;
* ``bench`` -- :func:`experiments.bench_kernels.sweep`: 2:4 and 90% block-sparse vs dense
  ``jnp.dot`` in bf16, ``M`` in {1, 16} (decode) and {512, 4096} (prefill), LLaMA-7B layers
  ``K x N`` = 4096x4096, 11008x4096 (down) and 4096x11008 (up/gate), median per matmul;
* ``sparsegpt`` -- SparseGPT time per LLaMA-7B-shaped layer (synthetic Hessians), 50% and 2:4;
* ``training`` -- one jitted train step of the zoo GPT (d=1024, 4 layers, seq 512): dense AdamW
  vs jaxprune static sparse (90%, ERK) vs RigL between mask updates.

Results: ``<results dir>/gpu/gpu_check_<device>.json`` and ``.md`` (device from
``jax.devices()[0].device_kind``); the markdown ends with the targets (2:4 decode >= 1.5x dense
bf16, 90% block-sparse >= 6x at large M). Exit status 1 if a section failed.

``--dry-run``: CPU, tiny shapes, Pallas interpret mode, every section, < 20 s; it also lowers the
GPU kernel variants for CUDA at the real LLaMA shapes (Pallas -> Triton, no GPU needed). It runs
in ``make test`` (``tests/test_gpu_check.py``) so this script never rots.

The GPU image has jax (CUDA), flax, optax and orbax but no data packages and no network: this
module imports only those (and the library), and runs from a plain checkout::

    PYTHONPATH=. python3 -m experiments.gpu_check          # or: make gpu-check
    PYTHONPATH=. python3 -m experiments.gpu_check --dry-run   # CPU smoke run

Adding a section: one function ``def name(ctx: Ctx) -> dict | None`` decorated with
``@section("name", "title", cap_s=...)`` (rows go through ``ctx.add``).
"""

from __future__ import annotations

import dataclasses
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _common

#: total budget (seconds) of a full run; sections get min(their cap, what is left)
BUDGET_S = 480.0
#: a section with less time than this left in the total budget is skipped
MIN_SECTION_S = 5.0
#: targets from issue 17: (kind, M range, minimum speedup vs dense bf16)
TARGETS = (("2:4", (1, 16), 1.5), ("block128x128", (4096, 4096), 6.0))
LLAMA_LAYERS = ((4096, 4096), (11008, 4096), (4096, 11008))  # K x N (fan-in x fan-out)


class SectionTimeout(Exception):
    """Raised by :meth:`Ctx.check_time` when a section is past its cap."""


class CheckFailed(AssertionError):
    """A section ran but a check in it failed (its rows say which)."""


@dataclasses.dataclass
class Ctx:
    """What a section gets: the mode, its deadline and a place for its rows."""

    dry_run: bool
    deadline: float
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def interpret(self) -> bool:
        """Pallas interpret mode (dry run) or compiled kernels."""
        return self.dry_run

    def left(self) -> float:
        """Seconds left before the section's cap."""
        return self.deadline - time.perf_counter()

    def check_time(self) -> None:
        """Raise :class:`SectionTimeout` when the cap has passed (call between work items)."""
        if self.left() < 0:
            raise SectionTimeout("time cap reached")

    def add(self, row: dict[str, Any]) -> None:
        """Record (and print) one result row, then check the cap."""
        self.rows.append(row)
        print("   ", "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        self.check_time()


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    title: str
    fn: Callable[[Ctx], dict[str, Any] | None]
    cap_s: float


SECTIONS: list[Section] = []


def section(name: str, title: str, *, cap_s: float) -> Callable:
    """Register ``fn(ctx)`` as a section (run in registration order, capped at ``cap_s``).

    >>> len(SECTIONS) >= 4
    True
    """

    def deco(fn: Callable[[Ctx], dict[str, Any] | None]) -> Callable:
        SECTIONS.append(Section(name, title, fn, cap_s))
        return fn

    return deco


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _median_time(fn: Callable[[], Any], runs: int) -> float:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


# ------------------------------------------------------------------------------------------------
# (a) kernel correctness, compiled
# ------------------------------------------------------------------------------------------------


def _rel_err(y: jax.Array, ref: jax.Array) -> tuple[float, float]:
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    err = float(np.max(np.abs(y - ref)))
    return err, err / max(float(np.max(np.abs(ref))), 1e-30)


def _abstract_nm(k: int, n: int, dtype: Any) -> Any:
    from jaxprune.kernels import formats as F

    f = F.codes_per_word(4)
    h = -(-(k // 4) // f)
    sd = jax.ShapeDtypeStruct
    return F.NMPacked(sd((2, f, h, n), dtype), sd((2, h, n), jnp.uint8), (k, n), 2, 4)


def _abstract_block(k: int, n: int, block: tuple[int, int], sparsity: float, dtype: Any) -> Any:
    from jaxprune.kernels import formats as F

    br, bc = block
    kb, nb = k // br, n // bc
    nnz = max(1, round((1 - sparsity) * kb * nb))
    per_col = min(kb, -(-nnz // nb) + 2)
    sd = jax.ShapeDtypeStruct
    i32 = jnp.int32
    return F.BlockSparse(sd((nnz, br, bc), dtype), sd((nnz,), i32), sd((nnz,), i32),
                         sd((nb + 1,), i32), (k, n), block, per_col)


@section("kernels", "Pallas kernels compiled on the device vs the jnp reference", cap_s=75)
def kernels(ctx: Ctx) -> dict[str, Any]:
    """2:4 and block-sparse, f32 and bf16, ragged and LLaMA-sized shapes, default ``impl``."""
    from jaxprune.core import patterns
    from jaxprune.kernels import _backend, formats, reference
    from jaxprune.kernels.block_sparse_matmul import block_sparse_matmul
    from jaxprune.kernels.nm_matmul import nm_matmul

    from . import bench_kernels

    if ctx.dry_run:
        cases, block, dtypes = [(32, 32, 5)], (16, 16), (jnp.float32, jnp.bfloat16)
    else:
        cases = [(1024, 512, 1), (2048, 1024, 16), (512, 384, 300)]  # bench: LLaMA shapes
        block, dtypes = (128, 128), (jnp.float32, jnp.bfloat16)
    # impl="auto" (the default path), no fallback; the dry run checks this script and the CUDA
    # lowering below with the reference op (interpret mode: tests/test_kernels.py and `bench`)
    kw = dict(impl="reference") if ctx.dry_run else dict(interpret=False, fallback=False)
    tols = {"float32": 1e-4, "bfloat16": 2e-2}
    impl = "reference (dry run)" if ctx.dry_run else "pallas-compiled"
    rng = np.random.default_rng(0)
    ok = True
    for k, n, m in cases:
        w = rng.standard_normal((k, n)).astype(np.float32)
        nm_mask = np.asarray(bench_kernels.mask(patterns.NM(2, 4), w, 0.5))
        blk_mask = np.asarray(bench_kernels.mask(patterns.Block(*block), w, 0.75))
        for dtype in dtypes:
            x = jnp.asarray(rng.standard_normal((m, k)), dtype)
            wd = jnp.asarray(w, dtype)
            for name, fn, packed in (
                ("2:4", nm_matmul, formats.pack_nm(wd, nm_mask, 2, 4)),
                (f"block{block[0]}x{block[1]} 75%", block_sparse_matmul,
                 formats.pack_block(wd, blk_mask, block)),
            ):
                t0 = time.perf_counter()
                y = jax.block_until_ready(jax.jit(lambda x, p, fn=fn: fn(x, p, **kw))(x, packed))
                first = time.perf_counter() - t0
                err, rel = _rel_err(y, jax.jit(reference.matmul_ref)(x, packed))  # eager: ~50 compiles
                tol = tols[jnp.dtype(dtype).name]
                ok &= rel <= tol and y.dtype == dtype
                ctx.add({"kernel": name, "dtype": jnp.dtype(dtype).name, "K": k, "N": n, "M": m,
                         "max_abs_err": err, "rel_err": rel, "tol": tol, "ok": rel <= tol,
                         "impl": impl, "first_call_s": first})
    # one gradient through the custom_vjp (kernel forward, XLA backward) vs the reference op
    k, n, m = cases[-1]
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    p = formats.pack_nm(w, bench_kernels.mask(patterns.NM(2, 4), w, 0.5), 2, 4)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)

    def loss(f, x, v):
        return jnp.sum(jnp.sin(f(x, p.replace(values=v))))

    g = jax.jit(jax.grad(lambda x, v: loss(lambda a, b: nm_matmul(a, b, **kw), x, v), (0, 1)))(
        x, p.values)
    g_ref = jax.jit(jax.grad(lambda x, v: loss(reference.nm_matmul_ref, x, v), (0, 1)))(x, p.values)
    rel = max(_rel_err(a, b)[1] for a, b in zip(g, g_ref, strict=True))
    ok &= rel <= 1e-3
    ctx.add({"kernel": "2:4 grad (x, values)", "dtype": "float32", "K": k, "N": n, "M": m,
             "rel_err": rel, "tol": 1e-3, "ok": rel <= 1e-3, "impl": impl})
    extra: dict[str, Any] = {"variant": _backend.resolve("auto", "auto", ctx.interpret)[1]}
    if ctx.dry_run:  # the GPU variants at the real shapes, lowered for CUDA (Pallas -> Triton)
        lowered = []
        for kk, nn in LLAMA_LAYERS:
            for fn, wt in ((nm_matmul, _abstract_nm(kk, nn, jnp.bfloat16)),
                           (block_sparse_matmul, _abstract_block(kk, nn, (128, 128), 0.9,
                                                                 jnp.bfloat16))):
                for mm in (16,):  # tiles depend on the layer (divisors of N, H); M only pads
                    f = jax.jit(lambda x, w, fn=fn: fn(x, w, impl="pallas", variant="gpu",
                                                       interpret=False))
                    text = _backend.lower_for_cuda(f, jax.ShapeDtypeStruct((mm, kk), jnp.bfloat16),
                                                   wt)
                    if "triton" not in text:
                        raise CheckFailed(f"{fn.__name__} {kk}x{nn} M={mm}: no Triton call lowered")
                    lowered.append(f"{fn.__name__} {kk}x{nn} M={mm}")
        extra["lowered_for_cuda"] = lowered
    if not ok:
        raise CheckFailed("a kernel result is off the reference (see rows with ok=False)")
    return extra


# ------------------------------------------------------------------------------------------------
# (b) kernel benchmark
# ------------------------------------------------------------------------------------------------


@section("bench", "2:4 and 90% block-sparse vs dense jnp.dot, bf16, median per matmul", cap_s=170)
def bench(ctx: Ctx) -> dict[str, Any]:
    """:func:`experiments.bench_kernels.sweep` on LLaMA-7B layers, decode and prefill ``M``."""
    from . import bench_kernels

    if ctx.dry_run:  # one copy per timed call: every copy is another kernel to trace
        layers, ms, block, runs, copy_bytes = [(32, 32)], (3,), (16, 16), 2, 1
    else:
        layers, ms, block, runs, copy_bytes = LLAMA_LAYERS, (1, 16, 512, 4096), (128, 128), 10, 192 << 20
    keep = ("kind", "M", "K", "N", "sparsity", "time_s", "dense_time_s", "speedup_vs_dense",
            "dense_over_weight_bytes", "bandwidth_GBps", "dense_equiv_TFLOPs", "impl",
            "max_abs_err", "copies", "first_call_s")
    bench_kernels.sweep(layers, ms, sparsities=(0.9,), block=block, runs=runs, warmup=2,
                        interpret=ctx.interpret, copies_bytes=copy_bytes,
                        on_row=lambda r: ctx.add({k: r[k] for k in keep if k in r}))
    return {"block": list(block), "runs": runs, "stat": "median per matmul"}


# ------------------------------------------------------------------------------------------------
# (c) SparseGPT per layer
# ------------------------------------------------------------------------------------------------


@section("sparsegpt", "SparseGPT seconds per LLaMA-7B-shaped layer (synthetic Hessian)", cap_s=90)
def sparsegpt(ctx: Ctx) -> dict[str, Any]:
    """``SparseGPT()(w, stats, ...)`` on ``fan_in x fan_out`` layers, 50% and 2:4."""
    from jaxprune.oneshot import LayerStats, SparseGPT

    if ctx.dry_run:
        layers, tokens, runs, targets = [(16, 8)], 32, 1, ((None, "2:4"),)
    else:
        layers, tokens, runs = [(4096, 4096), (11008, 4096)], 4096, 2
        targets = ((0.5, "unstructured"), (None, "2:4"))
    key = jax.random.key(0)
    for fin, fout in layers:
        kx, kw, key = jax.random.split(key, 3)
        x = jax.random.normal(kx, (tokens, fin), jnp.float32)
        gram = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)  # rank-full: tokens >= fan-in
        st = LayerStats(gram, jnp.sum(x, 0), jnp.sum(x * x, 0), tokens, fin)
        w = jax.random.normal(kw, (fin, fout), jnp.float32)
        for sparsity, pattern in targets:

            def call(sparsity=sparsity, pattern=pattern):
                return SparseGPT()(w, st, sparsity, pattern=pattern)

            t0 = time.perf_counter()
            new_w, mask = jax.block_until_ready(call())
            first = time.perf_counter() - t0
            kept = float(jnp.mean(mask))
            if not 0.49 <= kept <= 0.51 or bool(jnp.any(jnp.where(mask, 0.0, new_w) != 0)):
                raise CheckFailed(f"SparseGPT {fin}x{fout} {pattern}: kept {kept:.3f}, or a pruned "
                                  "weight is nonzero")
            ctx.check_time()
            ctx.add({"layer": f"{fin}x{fout}", "target": pattern if sparsity is None else "50%",
                     "median_s": _median_time(call, runs), "first_call_s": first,
                     "kept": kept, "runs": runs})
    return {"tokens": tokens}


# ------------------------------------------------------------------------------------------------
# (d) sparse training step vs dense
# ------------------------------------------------------------------------------------------------


@section("training", "train step: dense AdamW vs jaxprune sparse (zoo GPT)", cap_s=100)
def training(ctx: Ctx) -> dict[str, Any]:
    """Median jitted step of the zoo GPT with ``optax.adamw`` wrapped by jaxprune vs bare."""
    import optax

    import jaxprune as jp
    from jaxprune.zoo.loops import make_train_step
    from jaxprune.zoo.models import MLP
    from jaxprune.zoo.models.gpt import GPT, GPTConfig

    if ctx.dry_run:  # the same code path on a tiny MLP (a GPT compiles for ~10 s on CPU)
        model, batch, runs = MLP(features=(32, 32, 10)), 4, 2
        x = jax.random.normal(jax.random.key(1), (batch, 16))
        y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
        desc = "MLP 16-32-32-10"
    else:
        cfg, batch, runs = GPTConfig(d=1024, layers=4, heads=16, seq=512), 16, 10
        model = GPT(cfg)
        tokens = jax.random.randint(jax.random.key(1), (batch, cfg.seq + 1), 0, cfg.vocab)
        x, y = tokens[:, :-1], tokens[:, 1:]
        desc = f"GPT d={cfg.d} layers={cfg.layers} heads={cfg.heads} seq={cfg.seq}"
    params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]  # eager: a compile per op
    n_params = sum(int(a.size) for a in jax.tree.leaves(params))
    if ctx.dry_run:  # given masks: the random ERK draw costs ~5 s of CPU compile per optimizer
        masks = jax.tree.map(lambda a: a > 0 if a.ndim == 2 else None, params)  # ~50% kept
        variants = {"dense adamw": optax.adamw(3e-4),
                    "static_sparse (given masks)": jp.training.static_sparse(optax.adamw(3e-4),
                                                                             masks=masks)}
    else:
        variants = {
            "dense adamw": optax.adamw(3e-4),
            "static_sparse 90% (ERK)": jp.training.static_sparse(optax.adamw(3e-4), 0.9),
            "rigl 90% (between updates)": jp.training.rigl(optax.adamw(3e-4), 0.9,
                                                           update_period=1000, total_steps=100_000),
        }
    dense_t = None
    for name, tx in variants.items():
        step = make_train_step(model.apply, tx)
        p, s = params, jax.jit(tx.init)(params)
        t0 = time.perf_counter()
        p, s, loss = jax.block_until_ready(step(p, s, x, y))  # step 0 (compile; RigL may update)
        first = time.perf_counter() - t0
        p, s, loss = jax.block_until_ready(step(p, s, x, y))
        state = {"p": p, "s": s}

        def one(state=state, step=step):
            state["p"], state["s"], out = step(state["p"], state["s"], x, y)
            return out

        t = _median_time(one, runs)
        dense_t = t if dense_t is None else dense_t
        if not bool(jnp.isfinite(loss)):
            raise CheckFailed(f"{name}: loss is not finite")
        sp = 0.0 if name.startswith("dense") else float(
            jp.total_sparsity(state["p"], jp.get_masks(state["s"])))
        ctx.add({"variant": name, "step_s": t, "vs_dense": t / dense_t, "first_call_s": first,
                 "sparsity": sp, "loss": float(loss)})
    return {"model": desc, "batch": batch, "params": n_params}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# (e) 2:4 + int4/int8 kernel (issue 15; added by the quantization helper)
# ------------------------------------------------------------------------------------------------


@section("quant", "2:4 + int4/int8 matmul dequantizing in the kernel vs dense bf16", cap_s=90)
def quant(ctx: Ctx) -> dict[str, Any]:
    """:func:`jaxprune.kernels.nm_quant_matmul.bench_quant_kernel` on LLaMA-7B-shaped layers."""
    from jaxprune.kernels.nm_quant_matmul import bench_quant_kernel

    if ctx.dry_run:
        cases, dtype, iters = [(2, 64, 32, 32)], jnp.float32, 1
    else:
        cases = [(m, k, n, 128) for k, n in ((4096, 4096), (11008, 4096)) for m in (16, 512)]
        dtype, iters = jnp.bfloat16, 20
    for m, k, n, g in cases:
        for bits in (4, 8):
            r = bench_quant_kernel(m=m, k=k, n=n, bits=bits, group_size=g, dtype=dtype, iters=iters)
            if r["rel_err"] > 2e-2:  # bf16 rounding of the output; a wrong kernel is O(1)
                raise CheckFailed(f"nm_quant_matmul {m}x{k}x{n} int{bits}: rel err {r['rel_err']:.3g}")
            ctx.add({key: r[key] for key in ("m", "k", "n", "bits", "kernel_ms", "dense_ms",
                                             "reference_ms", "rel_err", "packed_bytes",
                                             "dense_bytes")})
    return {"group_size": 128, "dtype": str(jnp.dtype(dtype))}


def device_name() -> str:
    """``jax.devices()[0].device_kind`` (e.g. ``NVIDIA H200``).

    >>> isinstance(device_name(), str)
    True
    """
    d = jax.devices()[0]
    return str(getattr(d, "device_kind", d.platform))


def slug(text: str) -> str:
    """File-name form of a device name.

    >>> slug("NVIDIA H100 80GB HBM3")
    'nvidia_h100_80gb_hbm3'
    """
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "device"


def run_sections(dry_run: bool, budget_s: float, only: list[str] | None = None,
                 on_section: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the registered sections in order; one dict per section (status, seconds, rows, ...)."""
    t_start = time.perf_counter()
    out = []
    for sec in SECTIONS:
        if only and sec.name not in only:
            continue
        left = budget_s - (time.perf_counter() - t_start)
        cap = left if dry_run else min(sec.cap_s, left)  # a dry run is not capped per section
        res: dict[str, Any] = {"name": sec.name, "title": sec.title, "cap_s": cap, "rows": []}
        print(f"== {sec.name}: {sec.title} (cap {cap:.0f} s)", flush=True)
        if cap < MIN_SECTION_S:
            res.update(status="skipped", seconds=0.0, error="total budget spent")
        else:
            ctx = Ctx(dry_run, time.perf_counter() + cap)
            res["rows"] = ctx.rows
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                res.update(sec.fn(ctx) or {})
                res["status"] = "ok"
            except SectionTimeout:
                res.update(status="timeout", error=f"stopped at the {cap:.3g} s cap; rows so far kept")
            except Exception as e:  # noqa: BLE001 - report, then run the other sections
                res.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000],
                           traceback=traceback.format_exc()[-4000:])
            res["seconds"] = time.perf_counter() - t0
            res["cpu_s"] = time.process_time() - c0
        print(f"   -> {res['status']} in {res['seconds']:.1f} s (cpu {res.get('cpu_s', 0):.1f} s)"
              + (f": {res['error'][:300]}" if res.get("error") else ""), flush=True)
        out.append(res)
        if on_section is not None:
            on_section(res)
    return out


def targets(sections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked against the ``bench`` rows (``met`` is None if not measured).

    >>> rows = [{"kind": "2:4", "M": 1, "K": 8, "N": 8, "speedup_vs_dense": 1.6}]
    >>> targets([{"name": "bench", "rows": rows}])[0]["met"]
    True
    """
    rows = next((s["rows"] for s in sections if s["name"] == "bench"), [])
    out = []
    for kind, (lo, hi), need in TARGETS:
        got = [r for r in rows if r["kind"] == kind and lo <= r["M"] <= hi]
        worst = min((r["speedup_vs_dense"] for r in got), default=None)
        out.append({"target": f"{kind} at M in [{lo}, {hi}] >= {need}x dense bf16",
                    "worst_speedup": worst, "cases": len(got),
                    "met": None if worst is None else worst >= need})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The result as markdown: header, targets, then one table per section.

    >>> print(markdown({"device": "cpu", "sections": [], "targets": []}).splitlines()[0])
    # GPU check: cpu
    """
    lines = [f"# GPU check: {result['device']}", ""]
    for k in ("platform", "jax_version", "mode", "total_s", "date"):
        if k in result:
            lines.append(f"- {k}: {_fmt(result[k])}")
    if result.get("targets"):
        lines += ["", "## Targets", "", "| target | worst measured | met |", "|---|---|---|"]
        for t in result["targets"]:
            worst = "not measured" if t["worst_speedup"] is None else f"{t['worst_speedup']:.2f}x"
            lines.append(f"| {t['target']} | {worst} | {t['met']} |")
    for s in result["sections"]:
        lines += ["", f"## {s['name']}: {s['title']}", "",
                  f"status **{s['status']}** in {s.get('seconds', 0):.1f} s (cap {s['cap_s']:.0f} s)"]
        if s.get("error"):
            lines += ["", f"error: `{s['error'][:500]}`"]
        if s["rows"]:
            cols = list(dict.fromkeys(k for r in s["rows"] for k in r))
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in s["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``jaxprune run gpu_check``, ``make gpu-check``)."""
    ap = _common.parser("jaxprune run gpu_check", __doc__)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes, Pallas interpret mode: checks the script, not the GPU")
    ap.add_argument("--budget", type=_common.positive_float, default=BUDGET_S,
                    help=f"total seconds for all sections (default {BUDGET_S:.0f})")
    ap.add_argument("--only", nargs="+", choices=[s.name for s in SECTIONS], default=None,
                    help="run only these sections")
    args = ap.parse_args(argv)
    dry = args.dry_run or args.quick
    if dry:
        jax.config.update("jax_platforms", "cpu")
    dev = jax.devices()[0]
    if not dry and dev.platform not in ("gpu", "cuda", "rocm", "tpu"):
        print(f"gpu_check: jax sees no GPU/TPU (devices: {jax.devices()}); install jax with CUDA "
              "(pip install 'jax[cuda13]') or use --dry-run", file=sys.stderr)
        return 2
    name = device_name()
    base = _common.results_dir(args) / "gpu" / f"gpu_check_{slug(name)}{'_dryrun' if dry else ''}"
    result: dict[str, Any] = {
        "device": name, "platform": dev.platform, "device_count": jax.device_count(),
        "jax_version": jax.__version__, "python": platform.python_version(),
        "mode": "dry-run (CPU, interpret mode, tiny shapes: NOT performance numbers)" if dry
        else "compiled kernels", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "budget_s": args.budget, "sections": [], "targets": [],
    }
    t0 = time.perf_counter()

    def save(sec: dict[str, Any] | None = None) -> None:
        if sec is not None:
            result["sections"].append(sec)
        result["targets"] = targets(result["sections"])
        result["total_s"] = time.perf_counter() - t0
        _common.write_json(base.with_suffix(".json"), result, default=str)
        with _common.atomic_open(base.with_suffix(".md")) as f:
            f.write(markdown(result))

    print(f"gpu_check on {name} ({dev.platform}), jax {jax.__version__}, "
          f"{'dry run' if dry else f'budget {args.budget:.0f} s'}", flush=True)
    run_sections(dry, args.budget, args.only, on_section=save)
    save()
    print(markdown({**result, "sections": [{**s, "rows": []} for s in result["sections"]]}))
    print(f"wrote {base.with_suffix('.json')} and {base.with_suffix('.md')}")
    failed = [s["name"] for s in result["sections"] if s["status"] == "failed"]
    if failed:
        print(f"FAILED sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
