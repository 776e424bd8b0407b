"""Sparse and quantized: error against bits per weight on the trained GPT and on MiniLM.

Every configuration runs through the sequential driver (blocks fed the compressed blocks' outputs)
on the pruned/quantized layers (the blocks' kernels; embeddings, norms, biases and the GPT's output
layer stay float32, and are not counted):

* dense int2..int8, round-to-nearest (RTN) and GPTQ (symmetric, group of 128 fan-in rows);
* sparse, SparseGPT at 50%, 70%, 80%, 90% and 2:4, kept values in fp16 (rounded to fp16 before
  evaluation);
* 2:4 + int4 / int8 (group 128): SparseGPT then RTN (quantized separately), the joint SparseGPT +
  GPTQ sweep, OBR on Wanda's mask (the paper's setting) and OBR on SparseGPT's mask.

Bits per weight count what is stored, per weight of the dense matrix: kept values (fp16 = 16 bits;
dense int-b codes at b bits, i.e. ideally bit-packed; 2:4 codes as ``NMQuantPacked`` stores them, a
byte per int8 code, a nibble per int4 code), N:M position metadata (2 bits per kept value of 2:4,
as ``NMPacked``/``NMQuantPacked`` store it), a 1-bit mask per weight for unstructured sparsity
(``Bitmask``), and one float32 scale per group of 128 fan-in rows and output (0.25 bits). The
2:4 + int count is checked against ``NMQuantPacked.nbytes()`` of a real packed layer.

Error: the GPT's held-out byte perplexity; MiniLM's ``1 − cosine`` between compressed and dense
sentence embeddings (held-out sentences). Also a CPU benchmark: SparseGPT alone vs the joint sweep
vs OBR on the same synthetic layer (median of warm calls; the load average is recorded).

Tests the claim of Kuzmin et al. 2023 ("Pruning vs Quantization: which is better?"): at equal
size, quantization beats pruning except at very high compression.

    jaxprune run sparse_quant [--quick] [--skip-minilm]
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _common

GROUP = 128
SCALE_BITS = 32  # the formats store float32 scales


@dataclasses.dataclass(frozen=True)
class Config:
    """One compressed configuration: family (plot series), label, method, target, bits."""

    family: str
    label: str
    method: Any
    target: Any  # sparsity (float) or an N:M pattern string
    bits: float
    fp16: bool = False  # round the kept values to fp16


def bits_per_weight(sparsity: float | str, value_bits: float, quantized: bool) -> float:
    """Stored bits per dense weight (see the module docstring).

    >>> bits_per_weight(0.0, 4, True), bits_per_weight("2:4", 4, True), bits_per_weight(0.5, 16, False)
    (4.25, 3.25, 9.0)
    """
    scale = SCALE_BITS / GROUP if quantized else 0.0
    if isinstance(sparsity, str):  # N:M: position codes of ceil(log2 m) bits per kept value
        from jaxprune.kernels.formats import code_bits

        n, m = (int(v) for v in sparsity.split(":"))
        kept = n / m
        stored = value_bits if value_bits > 4 or not quantized else 4  # nibble-packed codes
        return kept * (stored + code_bits(m)) + scale
    if sparsity == 0:
        return value_bits + scale
    return (1 - sparsity) * value_bits + 1.0 + scale  # bitmask


def configs(quick: bool, model: str) -> list[Config]:
    """The configurations of one model (``--quick``: a few)."""
    from jaxprune.oneshot import GPTQ, OBR, SparseGPT
    from jaxprune.oneshot.quant import QuantSpec, RoundToNearest

    def q(b: int) -> QuantSpec:
        return QuantSpec(bits=b, group_size=GROUP)

    if quick:
        dense_bits, rtn_bits, sparse, nm_bits = [4], [4], ["2:4"], [4]
    elif model == "gpt":
        dense_bits, rtn_bits, sparse, nm_bits = [2, 3, 4, 5, 6, 8], [3, 4, 5, 8], \
            [0.5, 0.7, 0.8, 0.9, "2:4"], [4, 8]
    else:  # MiniLM: fewer (OBR's per-output Cholesky of the 768 kept rows of the 1536-wide
        # FFN output layer is the slow part on CPU)
        dense_bits, rtn_bits, sparse, nm_bits = [2, 3, 4, 8], [4, 8], [0.5, 0.8, "2:4"], [4, 8]
    out = [Config("dense RTN", f"int{b} RTN", RoundToNearest(None, q(b)), 0.0,
                  bits_per_weight(0.0, b, True)) for b in rtn_bits]
    out += [Config("dense GPTQ", f"int{b} GPTQ", GPTQ(quant=q(b)), 0.0,
                   bits_per_weight(0.0, b, True)) for b in dense_bits]
    out += [Config("sparse fp16 (SparseGPT)", f"{s} fp16", SparseGPT(), s,
                   bits_per_weight(s, 16, False), fp16=True) for s in sparse]
    for b in nm_bits:
        bits = bits_per_weight("2:4", b, True)
        out += [Config("2:4 + int, SparseGPT then RTN", f"2:4+int{b} sparsegpt+rtn",
                       RoundToNearest("sparsegpt", q(b)), "2:4", bits),
                Config("2:4 + int, joint sweep", f"2:4+int{b} joint", SparseGPT(quant=q(b)),
                       "2:4", bits),
                Config("2:4 + int, OBR (SparseGPT mask)", f"2:4+int{b} sparsegpt+obr",
                       OBR(base="sparsegpt", quant=q(b)), "2:4", bits)]
        if model == "gpt" or b == 4:
            out.append(Config("2:4 + int, OBR (Wanda mask)", f"2:4+int{b} obr", OBR(quant=q(b)),
                              "2:4", bits))
    return out


def _fp16(params: Any, masks: Any) -> Any:
    """Kept values of the compressed leaves rounded to fp16 (what a fp16 sparse format stores)."""
    import jax.numpy as jnp

    from jaxprune.core.masks import tree_map_masked

    return tree_map_masked(lambda m, p: p if m is None else
                           p.astype(jnp.float16).astype(p.dtype), masks, params)


def run_model(name: str, cfgs: list[Config], params: Any, blocks: list, calib: list,
              metric: Callable[[Any], float], token_masks: list | None = None) -> list[dict]:
    """Each configuration through the sequential driver; rows of the results table."""
    from tqdm.auto import tqdm

    from jaxprune.oneshot import prune_sequential

    rows = [{"model": name, "family": "dense f32", "config": "dense f32", "bits": 32.0,
             "error": metric(params), "seconds": 0.0}]
    for c in tqdm(cfgs, desc=name):
        sp, pat = (None, c.target) if isinstance(c.target, str) else (c.target, "unstructured")
        t0 = time.time()
        new, masks = prune_sequential(params, blocks, calib, c.method, sp, pattern=pat,
                                      token_masks=token_masks, progress=False)
        secs = time.time() - t0
        if c.fp16:
            new = _fp16(new, masks)
        rows.append({"model": name, "family": c.family, "config": c.label, "bits": c.bits,
                     "error": metric(new), "seconds": round(secs, 1)})
    return rows


def check_bits_against_packed() -> dict[str, float]:
    """2:4 + int4/int8 bits per weight from a real ``NMQuantPacked`` of a 512x128 layer."""
    from jaxprune.kernels.quant_formats import pack_nm_quant

    out = {}
    rng = np.random.default_rng(0)
    k, n = 512, 128
    mask = np.zeros((k, n), bool)
    mask[0::4] = mask[1::4] = True
    for b in (4, 8):
        codes = np.where(mask, rng.integers(-(2 ** (b - 1)) + 1, 2 ** (b - 1), (k, n)), 0)
        p = pack_nm_quant(codes.astype(np.int8), mask, np.ones((k // GROUP, n), np.float32), None,
                          bits=b, group_size=GROUP)
        out[f"2:4+int{b}"] = 8 * p.nbytes() / (k * n)
        assert out[f"2:4+int{b}"] == bits_per_weight("2:4", b, True), out
    return out


def bench(quick: bool, reps: int) -> dict[str, Any]:
    """CPU wall time of SparseGPT 2:4 vs the joint 2:4 + int4 sweep vs OBR on one layer."""
    import jax

    from jaxprune.oneshot import GPTQ, OBR, LayerStats, SparseGPT
    from jaxprune.oneshot.quant import QuantSpec

    fin, fout, tokens = (256, 256, 512) if quick else (768, 768, 2048)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(tokens, fin)) @ rng.normal(size=(fin, fin)) / np.sqrt(fin)
    x = x.astype(np.float32)
    st = LayerStats(x.T @ x, x.sum(0), (x**2).sum(0), tokens, fin)
    w = rng.normal(size=(fin, fout)).astype(np.float32)
    spec = QuantSpec(4, GROUP)
    methods = {"sparsegpt 2:4": SparseGPT(), "gptq int4 (dense)": GPTQ(quant=spec),
               "joint 2:4+int4": SparseGPT(quant=spec), "obr 2:4+int4 (wanda)": OBR(quant=spec),
               "obr 2:4+int4 (sparsegpt mask)": OBR(base="sparsegpt", quant=spec)}
    out: dict[str, Any] = {"shape": [fin, fout], "tokens": tokens, "repeats": reps, "rows": []}
    for label, meth in methods.items():
        pat = "unstructured" if label.startswith("gptq") else "2:4"
        t0 = time.perf_counter()
        jax.block_until_ready(meth(w, st, pattern=pat))  # first call: compiles
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(meth(w, st, pattern=pat))
            times.append(time.perf_counter() - t0)
        out["rows"].append({"method": label, "median_s": float(np.median(times)),
                            "times_s": times, "first_call_s": first})
    out["loadavg_1min"] = os.getloadavg()[0]
    return out


def layer_errors(params: Any, stats: dict, bits: list[int]) -> list[dict]:
    """Relative reconstruction error ‖WX−ŴX‖²/‖WX‖² of each calibrated layer of the first block
    (dense inputs) for the 2:4 + int methods: a comparison without the driver's feedback noise."""
    from jaxprune.oneshot import OBR, SparseGPT, recon_error
    from jaxprune.oneshot.quant import QuantSpec, RoundToNearest
    from jaxprune.oneshot.sequential import get_path

    out = []
    for b in bits:
        q = QuantSpec(bits=b, group_size=GROUP)
        meths = {"sparsegpt (fp32 values)": SparseGPT(), "sparsegpt+rtn": RoundToNearest("sparsegpt", q),
                 "joint": SparseGPT(quant=q), "obr": OBR(quant=q),
                 "sparsegpt+obr": OBR(base="sparsegpt", quant=q)}
        for path in sorted(k for k in stats if k.startswith("block_0/")):
            w = np.asarray(get_path(params, path))
            for label, meth in meths.items():
                new, _ = meth(w, stats[path], pattern="2:4", name=path)
                out.append({"bits": b, "layer": path, "method": label,
                            "rel_error": recon_error(w, np.asarray(new), stats[path].hessian)})
    return out


def verdict(rows: list[dict]) -> list[str]:
    """Pruning vs quantization at equal size: each sparse fp16 point against the best dense
    (GPTQ or RTN) point of at most its bits, and each 2:4 + int point likewise."""
    lines = []
    dense = [r for r in rows if r["family"].startswith("dense ") and r["family"] != "dense f32"]
    for r in rows:
        if not (r["family"].startswith("sparse") or r["family"].startswith("2:4")):
            continue
        fit = [d for d in dense if d["bits"] <= r["bits"] + 1e-9 and d["model"] == r["model"]]
        if not fit:
            lines.append(f"{r['model']}: {r['config']} ({r['bits']:.2f} b/w, error "
                         f"{r['error']:.4g}): no dense quantized model this small")
            continue
        best = min(fit, key=lambda d: d["error"])
        win = "quantization" if best["error"] <= r["error"] else "pruning"
        lines.append(f"{r['model']}: {r['config']} ({r['bits']:.2f} b/w, error {r['error']:.4g})"
                     f" vs {best['config']} ({best['bits']:.2f} b/w, error {best['error']:.4g}):"
                     f" {win} wins")
    return lines


def _write(args: Any, out: dict[str, Any], rows: list[dict]) -> None:
    """Write the CSV and JSON (after each model, so a long run keeps what it finished)."""
    out["rows"] = rows
    out["verdict"] = verdict(rows)
    _common.write_csv(_common.output_path(args, "sparse_quant.csv"), rows)
    _common.write_json(_common.output_path(args, "sparse_quant.json"), out)


def main(argv: list[str] | None = None) -> int:
    """Run the study; print the tables, the verdict and the benchmark."""
    ap = _common.parser("jaxprune run sparse_quant", __doc__)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-gpt", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--repeats", type=_common.positive_int, default=3, help="benchmark repeats")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"quick": args.quick, "group_size": GROUP, "scale_bits": SCALE_BITS,
                           "packed_bits_check": check_bits_against_packed()}
    rows: list[dict] = []
    old_path = _common.output_path(args, "sparse_quant.json")
    skipped = {"gpt": args.skip_gpt, "minilm": args.skip_minilm, "bench": args.skip_bench}
    if any(skipped.values()) and old_path.exists():  # keep what an earlier run measured
        import json

        old = json.loads(old_path.read_text())
        for part in [k for k, v in skipped.items() if v]:
            rows += [r for r in old.get("rows", []) if r["model"] == part]
            out.update({k: v for k, v in old.items() if k.startswith(part)})
    if not args.skip_gpt:
        from jaxprune.zoo.data import text_tfds
        from jaxprune.zoo.models.gpt import GPT, blocks, perplexity

        from .train_gpt import VAL_RECORDS, load_or_train

        cfg, params, info = load_or_train(quick=args.quick, results=args.results_dir)
        model = GPT(cfg)
        tr = text_tfds.load_split("train")[:, : cfg.seq + 1]
        va = text_tfds.load_split("validation")[:VAL_RECORDS, : cfg.seq + 1]
        n_cal, n_ev = (16, 64) if args.quick else (64, 256)
        cal = tr[np.random.default_rng(1).choice(len(tr), n_cal, replace=False), :-1]
        cal = cal.astype(np.int32)
        calib = [cal[i:i + 8] for i in range(0, n_cal, 8)]
        ev = va[:n_ev]
        rows += run_model("gpt", configs(args.quick, "gpt"), params, blocks(cfg), calib,
                          lambda p: perplexity(model, p, ev))
        from jaxprune.oneshot import calibrate

        out["gpt_layer_errors"] = layer_errors(params, calibrate(model, params, calib),
                                               [4] if args.quick else [4, 8])
        out["gpt"] = {"train": info, "calib_records": n_cal, "eval_records": n_ev,
                      "metric": "held-out byte perplexity"}
        _write(args, out, rows)
    if not args.skip_minilm:
        from jaxprune.zoo.data.text_tfds import stdlib_sentences
        from jaxprune.zoo.models import bert

        model_b, params_b, tok = bert.load_minilm()
        n_cal, n_ev = (64, 48) if args.quick else (400, 200)
        calib_b = bert.calibration_batches(tok, stdlib_sentences(n_cal, "train"), 32)
        texts = stdlib_sentences(n_ev, "validation")
        dense_emb = bert.embed_texts(model_b, params_b, tok, texts)

        def one_minus_cos(p: Any) -> float:
            emb = bert.embed_texts(model_b, p, tok, texts)
            return float(1.0 - (emb * dense_emb).sum(1).mean())

        rows += run_model("minilm", configs(args.quick, "minilm"), params_b,
                          bert.blocks(model_b.cfg), calib_b, one_minus_cos,
                          token_masks=[m for _, m in calib_b])
        out["minilm"] = {"calib_sentences": n_cal, "eval_sentences": n_ev,
                         "metric": "1 - cosine(compressed, dense embedding)"}
        _write(args, out, rows)
    if not args.skip_bench:
        out["bench"] = bench(args.quick, 2 if args.quick else args.repeats)
    rows.sort(key=lambda r: r["model"] != "gpt")
    _write(args, out, rows)
    if out.get("gpt_layer_errors"):
        le = out["gpt_layer_errors"]
        labels = list(dict.fromkeys(r["method"] for r in le))
        print("GPT block 0, 2:4 + int, relative layer error ||WX - W'X||^2 / ||WX||^2 (dense inputs)")
        print(f"{'bits layer':30s} " + " ".join(f"{m[:14]:>14s}" for m in labels))
        for b, path in dict.fromkeys((r["bits"], r["layer"]) for r in le):
            errs = {r["method"]: r["rel_error"] for r in le if r["bits"] == b and r["layer"] == path}
            print(f"{b:<4d} {path:25s} " + " ".join(f"{errs[m]:14.5f}" for m in labels))
        print()
    print(f"{'model':7s} {'config':26s} {'bits/w':>6s} {'error':>9s} {'sec':>6s}")
    for r in rows:
        print(f"{r['model']:7s} {r['config']:26s} {r['bits']:6.2f} {r['error']:9.4f} "
              f"{r['seconds']:6.1f}")
    print("\n(error: GPT held-out byte perplexity; MiniLM 1 - cosine to the dense embedding)")
    print("\nPruning vs quantization at equal size:")
    for line in out["verdict"]:
        print("  " + line)
    b = out.get("bench", {"shape": [0, 0], "tokens": 0, "repeats": 0, "loadavg_1min": 0, "rows": []})
    print(f"\nCPU benchmark, one {b['shape'][0]}x{b['shape'][1]} layer, {b['tokens']} tokens, "
          f"median of {b['repeats']} warm calls (load average {b['loadavg_1min']:.1f}):")
    for r in b["rows"]:
        print(f"  {r['method']:30s} {r['median_s']:8.3f} s   (first call {r['first_call_s']:.2f} s)")
    with _common.optional_plot("sparse_quant.png"):
        models = [m for m in ("gpt", "minilm") if any(r["model"] == m for r in rows)]
        fig, axes = _common.figure((6 * len(models), 4.5), ncols=len(models))
        axes = np.atleast_1d(axes)
        for ax, m in zip(axes, models, strict=True):
            mr = [r for r in rows if r["model"] == m]
            for fam in dict.fromkeys(r["family"] for r in mr):
                pts = sorted((r["bits"], r["error"]) for r in mr if r["family"] == fam)
                if fam == "dense f32":
                    ax.axhline(pts[0][1], color="k", ls="--", label="dense f32")
                    continue
                ax.plot(*zip(*pts, strict=True), "o-" if len(pts) > 1 else "s", label=fam)
            ax.set_xlabel("stored bits per weight")
            ax.set_ylabel("held-out perplexity" if m == "gpt" else "1 - cosine to dense")
            ax.set_yscale("log")
            ax.set_title(m)
            ax.legend(fontsize=7)
        _common.save_figure(fig, _common.output_path(args, "sparse_quant.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
