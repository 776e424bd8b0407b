"""Sparse and quantized: error against bits per weight on the trained GPT, MiniLM and Gemma 3 270M.

On the GPT and MiniLM every configuration runs through the sequential driver (blocks fed the
compressed blocks' outputs); on Gemma through ``prune_layers`` on one calibration (layer-wise, dense
inputs, as ``oneshot_gemma`` prunes, so its SparseGPT rows are comparable to that study's). Only the
blocks' kernels are compressed (embeddings, norms, biases and the GPT's output layer stay float32,
and are not counted):

* dense int2..int8, round-to-nearest (RTN) and GPTQ (symmetric, group of 128 fan-in rows);
* sparse, SparseGPT at 50%, 70%, 80%, 90% and 2:4, kept values in fp16 (rounded to fp16 before
  evaluation);
* 2:4 + int4 / int8 (group 128): SparseGPT then RTN (quantized separately), the joint SparseGPT +
  GPTQ sweep, OBR on SparseGPT's mask and OBR on Wanda's mask (the paper's setting; not on Gemma,
  where it costs as much as the other OBR rows);

each model a subset (see :func:`configs`).

Bits per weight count what is stored, per weight of the dense matrix: kept values (fp16 = 16 bits;
dense int-b codes at b bits, i.e. ideally bit-packed; 2:4 codes as ``NMQuantPacked`` stores them, a
byte per int8 code, a nibble per int4 code), N:M position metadata (2 bits per kept value of 2:4,
as ``NMPacked``/``NMQuantPacked`` store it), a 1-bit mask per weight for unstructured sparsity
(``Bitmask``), and one float32 scale per group of 128 fan-in rows and output (0.25 bits). The
2:4 + int count is checked against ``NMQuantPacked.nbytes()`` of a real packed layer.

Error: the GPT's held-out byte perplexity; MiniLM's ``1 − cosine`` between compressed and dense
sentence embeddings (held-out sentences); Gemma's perplexity on the Python-docs test windows, as
``oneshot_gemma`` measures it (setup: :mod:`experiments._gemma`; its dense baseline is the Q4_K_M
GGUF dequantized to float32). Every row records the compression wall time, the evaluation time and
the peak resident memory. On Gemma each 2:4 + int row also packs every compressed layer (its real
mask and shape) as ``NMQuantPacked`` and records the stored bits per weight that gives
(``packed_bits``), whether every mask is exactly 2:4 along the fan-in and every pruned weight 0, and
the most distinct kept values in any (scale group, output) (at most ``2**bits`` on an int grid).
Also a CPU benchmark: SparseGPT alone vs the joint sweep vs OBR on the same synthetic layer (median
of warm calls; the load average is recorded).

Tests the claim of Kuzmin et al. 2023 ("Pruning vs Quantization: which is better?"): at equal
size, quantization beats pruning except at very high compression.

Gemma is not run by default (it needs the ``llm`` extra and ``python3.11-doc``, and OBR on its
90 projections is the slow part: ``--no-obr`` skips it). Models not run keep the rows an earlier
run wrote to the same results file, so the one plot shows every model measured.

    jaxprune run sparse_quant [--quick] [--skip-minilm] [--skip-gpt] [--skip-bench]
    jaxprune run sparse_quant --models gemma --skip-bench [--calib 32] [--eval 16] [--no-obr]
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _common, _gemma

GROUP = 128
SCALE_BITS = 32  # the formats store float32 scales
MODELS = ("gpt", "minilm", "gemma")
METRICS = {"gpt": "held-out byte perplexity", "minilm": "1 - cosine(compressed, dense embedding)",
           "gemma": "test perplexity (Python docs windows)"}


@dataclasses.dataclass(frozen=True)
class Config:
    """One compressed configuration: family (plot series), label, method, target, bits."""

    family: str
    label: str
    method: Any
    target: Any  # sparsity (float) or an N:M pattern string
    bits: float
    fp16: bool = False  # round the kept values to fp16


def bits_per_weight(sparsity: float | str, value_bits: float, quantized: bool,
                    group: int = GROUP) -> float:
    """Stored bits per dense weight (see the module docstring); ``group`` fan-in rows per scale.

    >>> bits_per_weight(0.0, 4, True), bits_per_weight("2:4", 4, True), bits_per_weight(0.5, 16, False)
    (4.25, 3.25, 9.0)
    """
    scale = SCALE_BITS / group if quantized else 0.0
    if isinstance(sparsity, str):  # N:M: position codes of ceil(log2 m) bits per kept value
        from jaxprune.kernels.formats import code_bits

        n, m = (int(v) for v in sparsity.split(":"))
        kept = n / m
        stored = value_bits if value_bits > 4 or not quantized else 4  # nibble-packed codes
        return kept * (stored + code_bits(m)) + scale
    if sparsity == 0:
        return value_bits + scale
    return (1 - sparsity) * value_bits + 1.0 + scale  # bitmask


def configs(quick: bool, model: str, group: int = GROUP, obr: bool = True) -> list[Config]:
    """The configurations of one model (``--quick``: a few; ``obr=False``: no OBR rows).

    >>> [c.label for c in configs(True, "gemma", obr=False)]  # doctest: +NORMALIZE_WHITESPACE
    ['int4 RTN', 'int4 GPTQ', '2:4 fp16', '2:4+int4 sparsegpt+rtn', '2:4+int4 joint']
    """
    from jaxprune.oneshot import GPTQ, OBR, SparseGPT
    from jaxprune.oneshot.quant import QuantSpec, RoundToNearest

    def q(b: int) -> QuantSpec:
        return QuantSpec(bits=b, group_size=group)

    def bpw(s: float | str, b: float, quantized: bool) -> float:
        return bits_per_weight(s, b, quantized, group)

    if quick:
        dense_bits, rtn_bits, sparse, nm_bits = [4], [4], ["2:4"], [4]
    elif model == "gpt":
        dense_bits, rtn_bits, sparse, nm_bits = [2, 3, 4, 5, 6, 8], [3, 4, 5, 8], \
            [0.5, 0.7, 0.8, 0.9, "2:4"], [4, 8]
    elif model == "gemma":  # OBR (Wanda mask) left out: as slow as OBR on SparseGPT's mask
        dense_bits, rtn_bits, sparse, nm_bits = [2, 3, 4, 8], [4, 8], [0.5, 0.7, 0.8, "2:4"], [4, 8]
    else:  # MiniLM: fewer (OBR's per-output Cholesky of the 768 kept rows of the 1536-wide
        # FFN output layer is the slow part on CPU)
        dense_bits, rtn_bits, sparse, nm_bits = [2, 3, 4, 8], [4, 8], [0.5, 0.8, "2:4"], [4, 8]
    out = [Config("dense RTN", f"int{b} RTN", RoundToNearest(None, q(b)), 0.0,
                  bpw(0.0, b, True)) for b in rtn_bits]
    out += [Config("dense GPTQ", f"int{b} GPTQ", GPTQ(quant=q(b)), 0.0,
                   bpw(0.0, b, True)) for b in dense_bits]
    out += [Config("sparse fp16 (SparseGPT)", f"{s} fp16", SparseGPT(), s,
                   bpw(s, 16, False), fp16=True) for s in sparse]
    for b in nm_bits:
        bits = bpw("2:4", b, True)
        out += [Config("2:4 + int, SparseGPT then RTN", f"2:4+int{b} sparsegpt+rtn",
                       RoundToNearest("sparsegpt", q(b)), "2:4", bits),
                Config("2:4 + int, joint sweep", f"2:4+int{b} joint", SparseGPT(quant=q(b)),
                       "2:4", bits)]
        if not obr:
            continue
        out.append(Config("2:4 + int, OBR (SparseGPT mask)", f"2:4+int{b} sparsegpt+obr",
                          OBR(base="sparsegpt", quant=q(b)), "2:4", bits))
        if model == "gpt" or (model == "minilm" and b == 4):
            out.append(Config("2:4 + int, OBR (Wanda mask)", f"2:4+int{b} obr", OBR(quant=q(b)),
                              "2:4", bits))
    return out


def _fp16(params: Any, masks: Any) -> Any:
    """Kept values of the compressed leaves rounded to fp16 (what a fp16 sparse format stores)."""
    import jax.numpy as jnp

    from jaxprune.core.masks import tree_map_masked

    return tree_map_masked(lambda m, p: p if m is None else
                           p.astype(jnp.float16).astype(p.dtype), masks, params)


def _sparsity(masks: Any) -> float:
    """Pruned share of the compressed leaves' weights (0.0 for no masks)."""
    import jax

    kept = [np.asarray(m) for m in jax.tree.leaves(masks)]
    return 1 - sum(int(m.sum()) for m in kept) / sum(m.size for m in kept) if kept else 0.0


def run_model(name: str, cfgs: list[Config], compress: Callable[[Any, Any, Any], tuple[Any, Any]],
              params: Any, metric: Callable[[Any], float],
              check: Callable[[Config, Any, Any], dict] | None = None,
              save: Callable[[list[dict]], None] | None = None,
              keep: tuple[str, ...] = ()) -> tuple[list[dict], dict[str, Any]]:
    """Each configuration through ``compress(method, sparsity, pattern) -> (params, masks)``; the
    rows of the results table (``check(config, params, masks)`` adds columns; ``save(rows)`` after
    each row) and ``{label: compressed params}`` of the configurations named in ``keep``."""
    import jax
    from tqdm.auto import tqdm

    def measured(fn: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any, dict]:
        with _common.peak_rss() as mem:
            t0 = time.time()
            new, masks = jax.block_until_ready(fn())
            secs = time.time() - t0
            t1 = time.time()
            err = metric(new)
            ev_s = time.time() - t1
        return new, masks, {"error": err, "sparsity": round(_sparsity(masks), 4),
                            "seconds": round(secs, 1), "eval_s": round(ev_s, 1),
                            "peak_rss_mb": round(mem.mb)}

    rows = [{"model": name, "family": "dense f32", "config": "dense f32", "bits": 32.0,
             **measured(lambda: (params, None))[2]}]
    kept: dict[str, Any] = {}
    for c in tqdm(cfgs, desc=name):
        sp, pat = (None, c.target) if isinstance(c.target, str) else (c.target, "unstructured")

        def one(c: Config = c, sp: Any = sp, pat: Any = pat) -> tuple[Any, Any]:
            new, masks = compress(c.method, sp, pat)
            return (_fp16(new, masks) if c.fp16 else new), masks

        new, masks, m = measured(one)
        rows.append({"model": name, "family": c.family, "config": c.label, "bits": c.bits, **m,
                     **(check(c, new, masks) if check else {})})
        if c.label in keep:
            kept[c.label] = new
        if save:
            save(rows)
    return rows, kept


def nm_quant_check(params: Any, masks: Any, stats: dict, bits: int, group: int) -> dict[str, Any]:
    """A 2:4 + int-``bits`` result, checked layer by layer in its calibrated ``(fan_in, out)`` view:
    ``packed_bits`` (8 · Σ ``NMQuantPacked.nbytes()`` of each layer packed with its real mask and
    shape, over Σ weights), ``nm_exact`` (every group of 4 fan-in rows keeps exactly 2 per output
    and every pruned weight is 0; else ``packed_bits`` is NaN) and ``max_levels`` (most distinct
    kept values in any scale group of one output: at most ``2**bits`` on an int grid, about
    ``group / 2`` unquantized).

    >>> w = np.zeros((16, 2), np.float32); w[0::4] = 1.0; w[1::4] = -2.0
    >>> nm_quant_check({"k": w}, {"k": w != 0}, {"k": 16}, 4, 16)
    {'packed_bits': 5.0, 'nm_exact': True, 'max_levels': 2}
    """
    from jaxprune.core.masks import leaves_with_paths
    from jaxprune.kernels.quant_formats import pack_nm_quant
    from jaxprune.oneshot.calibration import as_matrix

    mk = dict(leaves_with_paths(masks))
    nbytes = weights = levels = 0
    exact = True
    for path, w in leaves_with_paths(params):
        if mk.get(path) is None:
            continue
        w2 = np.asarray(as_matrix(w, stats[path], path))
        m2 = np.asarray(as_matrix(mk[path], stats[path], path)).astype(bool)
        k, n = w2.shape
        weights += k * n
        if not ((m2.reshape(k // 4, 4, n).sum(1) == 2).all() and (w2[~m2] == 0).all()):
            exact = False  # not storable as 2:4: no packed size
            continue
        p = pack_nm_quant(np.zeros((k, n), np.int8), m2, np.ones((k // group, n), np.float32), None,
                          bits=bits, group_size=group)
        nbytes += p.nbytes()
        v = np.sort(np.where(m2, w2, np.nan).reshape(k // group, group, n), axis=1)
        new = np.isfinite(v) & np.concatenate([np.ones_like(v[:, :1], bool), v[:, 1:] != v[:, :-1]], 1)
        levels = max(levels, int(new.sum(1).max()))
    return {"packed_bits": 8 * nbytes / weights if exact else float("nan"), "nm_exact": exact,
            "max_levels": levels}


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


def layer_errors(params: Any, stats: dict, bits: list[int], group: int = GROUP,
                 block: str = "block_0/", obr: bool = True) -> list[dict]:
    """Relative reconstruction error ‖WX−ŴX‖²/‖WX‖² of each calibrated layer of the first block
    (paths starting with ``block``; dense inputs) for the 2:4 + int methods (``obr=False``: without
    OBR): a comparison without the driver's feedback noise."""
    from jaxprune.oneshot import OBR, SparseGPT, as_matrix, recon_error
    from jaxprune.oneshot.quant import QuantSpec, RoundToNearest
    from jaxprune.oneshot.sequential import get_path

    out = []
    for b in bits:
        q = QuantSpec(bits=b, group_size=group)
        meths = {"sparsegpt (fp32 values)": SparseGPT(), "sparsegpt+rtn": RoundToNearest("sparsegpt", q),
                 "joint": SparseGPT(quant=q)}
        if obr:
            meths.update({"obr": OBR(quant=q), "sparsegpt+obr": OBR(base="sparsegpt", quant=q)})
        for path in sorted(k for k in stats if k.startswith(block)):
            w = np.asarray(get_path(params, path))
            for label, meth in meths.items():
                new, _ = meth(w, stats[path], pattern="2:4", name=path)
                out.append({"bits": b, "layer": path, "method": label, "rel_error": recon_error(
                    as_matrix(w, stats[path], path), as_matrix(new, stats[path], path),
                    stats[path].hessian)})
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
    """Write the CSV and JSON (after each row or model, so a long run keeps what it finished)."""
    rows = sorted(rows, key=lambda r: MODELS.index(r["model"]))  # stable: configs keep their order
    out["rows"] = rows
    out["verdict"] = verdict(rows)
    fields = list(dict.fromkeys(k for r in rows for k in r))  # older rows lack the newer columns
    _common.write_csv(_common.output_path(args, "sparse_quant.csv"), rows, fields)
    _common.write_json(_common.output_path(args, "sparse_quant.json"), out)


def _configs(args: Any, model: str) -> list[Config]:
    """The configurations of ``model`` this run computes (``--configs``: only those labels)."""
    cfgs = configs(args.quick, model, args.group, not args.no_obr)
    return [c for c in cfgs if args.configs is None or c.label in args.configs]


def _merge(model: str, new: list[dict], old: list[dict], args: Any) -> list[dict]:
    """``new`` rows of ``model`` plus the ``old`` ones of configurations not run now, in the order
    of :func:`configs` (a ``--configs`` run adds to or replaces rows of an earlier run)."""
    order = ["dense f32"] + [c.label for c in configs(args.quick, model, args.group)]
    done = {r["config"] for r in new}
    rows = new + [r for r in old if r["model"] == model and r["config"] not in done]
    return sorted(rows, key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))


def _run_gpt(args: Any, out: dict[str, Any], save: Callable[[list[dict]], None]) -> list[dict]:
    """The trained byte GPT (sequential driver); sets ``out["gpt"]`` and ``out["gpt_layer_errors"]``."""
    from jaxprune.oneshot import calibrate, prune_sequential
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
    rows, _ = run_model("gpt", _configs(args, "gpt"),
                        lambda m, sp, pat: prune_sequential(params, blocks(cfg), calib, m, sp,
                                                            pattern=pat, progress=False),
                        params, lambda p: perplexity(model, p, ev), save=save)
    out["gpt_layer_errors"] = layer_errors(params, calibrate(model, params, calib),
                                           [4] if args.quick else [4, 8], args.group,
                                           obr=not args.no_obr)
    out["gpt"] = {"train": info, "calib_records": n_cal, "eval_records": n_ev, "metric": METRICS["gpt"]}
    return rows


def _run_minilm(args: Any, out: dict[str, Any], save: Callable[[list[dict]], None]) -> list[dict]:
    """all-MiniLM-L6-v2 (sequential driver, padded tokens masked out); sets ``out["minilm"]``."""
    from jaxprune.oneshot import prune_sequential
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

    rows, _ = run_model("minilm", _configs(args, "minilm"),
                        lambda m, sp, pat: prune_sequential(
                            params_b, bert.blocks(model_b.cfg), calib_b, m, sp, pattern=pat,
                            token_masks=[mk for _, mk in calib_b], progress=False),
                        params_b, one_minus_cos, save=save)
    out["minilm"] = {"calib_sentences": n_cal, "eval_sentences": n_ev, "metric": METRICS["minilm"]}
    return rows


def _run_gemma(args: Any, out: dict[str, Any], save: Callable[[list[dict]], None]) -> list[dict] | int:
    """Gemma 3 270M (``prune_layers`` on one calibration, as ``oneshot_gemma``); sets
    ``out["gemma"]``; an exit status when the ``llm`` extra or the Python docs are missing."""
    from jaxprune.oneshot import prune_layers
    from jaxprune.zoo.models.gemma import perplexity

    if args.quick:
        args.calib, args.seq, args.eval, args.eval_seq, args.gen = 4, 64, 2, 64, 4
    s = _gemma.setup(args, "sparse_quant")
    if isinstance(s, int):
        return s
    info = out.setdefault("gemma", {})  # a --configs run keeps the earlier generations
    info.update({**s.info, "metric": METRICS["gemma"], "load_average_start": _gemma.load_average(),
                 "driver": "prune_layers on one dense calibration (layer-wise, dense inputs), "
                           "the 90 block projections"})
    with _common.peak_rss() as mem:
        t0 = time.time()
        stats = _gemma.block_stats(s)
        info["calibration_s"] = round(time.time() - t0, 1)
    info["calibration_peak_rss_mb"] = round(mem.mb)
    print(f"gemma: calibrated {len(stats)} projections on {s.cal.size} tokens in "
          f"{info['calibration_s']} s (peak {mem.mb:.0f} MiB)", flush=True)

    def check(c: Config, new: Any, masks: Any) -> dict:
        quant = getattr(c.method, "quant", None)
        if c.target != "2:4" or quant is None:
            return {}
        return nm_quant_check(new, masks, stats, quant.bits, args.group)

    keep = ("2:4 fp16", "2:4+int4 joint", "2:4+int4 sparsegpt+obr")
    rows, kept = run_model("gemma", _configs(args, "gemma"),
                           lambda m, sp, pat: prune_layers(s.params, stats, m, sp, pattern=pat),
                           s.params, lambda p: perplexity(s.model, p, s.ev), check, save,
                           keep if args.gen else ())
    t0 = time.time()
    out["gemma_layer_errors"] = layer_errors(s.params, stats, [4], args.group, "layer_0/",
                                             not args.no_obr)
    info["layer_errors_s"] = round(time.time() - t0, 1)
    if args.gen:
        variants = {"dense": (s.model, s.params), **{k: (s.model, v) for k, v in kept.items()}}
        info["generations"] = _gemma.generations(s, variants, args.gen,
                                                 _gemma.PROMPTS[:1] if args.quick else None)
    info["load_average_end"] = _gemma.load_average()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the study; print the tables, the verdict and the benchmark."""
    ap = _common.parser("jaxprune run sparse_quant", __doc__)
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None,
                    help="models to run (default: gpt minilm); models not run keep the rows of "
                         "the existing results file")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-gpt", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--repeats", type=_common.positive_int, default=3, help="benchmark repeats")
    ap.add_argument("--group", type=_common.positive_int, default=GROUP,
                    help=f"fan-in rows per quantization scale (default {GROUP})")
    ap.add_argument("--configs", nargs="+", default=None, metavar="LABEL",
                    help="run only these configurations (labels as in the table, e.g. "
                         "'2:4+int4 sparsegpt+obr') and the dense row; the other rows of the models "
                         "run are kept from the existing results file")
    ap.add_argument("--no-obr", action="store_true",
                    help="skip the OBR rows (the slow method; on Gemma ~1 h per OBR row on 2 "
                         "busy CPU cores)")
    _gemma.add_size_flags(ap.add_argument_group("Gemma (--models gemma)"), calib=32)
    args = ap.parse_args(argv)
    models = [m for m in (args.models or ["gpt", "minilm"])
              if not (m == "gpt" and args.skip_gpt or m == "minilm" and args.skip_minilm)]
    if args.configs is not None:
        known = {c.label for m in models for c in configs(args.quick, m, args.group, not args.no_obr)}
        unknown = sorted(set(args.configs) - known)
        if unknown:
            ap.error(f"--configs: {unknown} are not configurations of {models}"
                     f"{' (--no-obr)' if args.no_obr else ''}; known: {sorted(known)}")
    out: dict[str, Any] = {"quick": args.quick, "group_size": args.group, "scale_bits": SCALE_BITS,
                           "packed_bits_check": check_bits_against_packed()}
    rows: list[dict] = []
    old_path = _common.output_path(args, "sparse_quant.json")
    kept_parts = [m for m in MODELS if m not in models] + (["bench"] if args.skip_bench else [])
    old: dict[str, Any] = {}
    if old_path.exists():  # keep what an earlier run measured for the parts not run now
        import json

        old = json.loads(old_path.read_text())
        for part in kept_parts + (models if args.configs is not None else []):
            out.update({k: v for k, v in old.items() if k.startswith(part)})
        rows += [r for r in old.get("rows", []) if r["model"] in kept_parts]
    old_rows = old.get("rows", []) if args.configs is not None else []
    runners = {"gpt": _run_gpt, "minilm": _run_minilm, "gemma": _run_gemma}
    for m in models:
        got = runners[m](args, out, lambda new, done=list(rows), m=m: _write(
            args, out, done + _merge(m, new, old_rows, args)))
        if isinstance(got, int):
            return got
        rows += _merge(m, got, old_rows, args)
        _write(args, out, rows)
    if not args.skip_bench:
        out["bench"] = bench(args.quick, 2 if args.quick else args.repeats)
    _write(args, out, rows)
    rows = out["rows"]
    for name in (m for m in MODELS if out.get(f"{m}_layer_errors")):
        le = out[f"{name}_layer_errors"]
        labels = list(dict.fromkeys(r["method"] for r in le))
        print(f"{name} first block, 2:4 + int, relative layer error ||WX - W'X||^2 / ||WX||^2 "
              "(dense inputs)")
        print(f"{'bits layer':37s} " + " ".join(f"{lb[:14]:>14s}" for lb in labels))
        for b, path in dict.fromkeys((r["bits"], r["layer"]) for r in le):
            errs = {r["method"]: r["rel_error"] for r in le if r["bits"] == b and r["layer"] == path}
            print(f"{b:<4d} {path:32s} " + " ".join(f"{errs[lb]:14.5f}" for lb in labels))
        print()
    print(f"{'model':7s} {'config':26s} {'bits/w':>6s} {'error':>9s} {'sec':>6s} {'eval s':>6s} "
          f"{'peak MiB':>8s} {'packed b/w':>10s} {'2:4 exact':>9s} {'levels':>6s}")
    for r in rows:
        extra = (f" {r['packed_bits']:10.4f} {str(r['nm_exact']):>9s} {r['max_levels']:6d}"
                 if "packed_bits" in r else "")
        print(f"{r['model']:7s} {r['config']:26s} {r['bits']:6.2f} {r['error']:9.4f} "
              f"{r['seconds']:6.1f} {r.get('eval_s', float('nan')):6.1f} "
              f"{r.get('peak_rss_mb', float('nan')):8.0f}{extra}")
    print("\n(error: " + "; ".join(f"{m}: {METRICS[m]}" for m in MODELS) + ")")
    _gemma.print_generations(out.get("gemma", {}).get("generations", []))
    print("\nPruning vs quantization at equal size:")
    for line in out["verdict"]:
        print("  " + line)
    b = out.get("bench", {"shape": [0, 0], "tokens": 0, "repeats": 0, "loadavg_1min": 0, "rows": []})
    print(f"\nCPU benchmark, one {b['shape'][0]}x{b['shape'][1]} layer, {b['tokens']} tokens, "
          f"median of {b['repeats']} warm calls (load average {b['loadavg_1min']:.1f}):")
    for r in b["rows"]:
        print(f"  {r['method']:30s} {r['median_s']:8.3f} s   (first call {r['first_call_s']:.2f} s)")
    with _common.optional_plot("sparse_quant.png"):
        models = [m for m in MODELS if any(r["model"] == m for r in rows)]
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
            ax.set_ylabel(METRICS[m])
            ax.set_yscale("log")
            dense = next((r["error"] for r in mr if r["family"] == "dense f32"), 0.0)
            off = [r for r in mr if dense > 0 and r["error"] > 50 * dense]  # collapsed: off scale
            if off:
                ax.set_ylim(top=50 * dense)
                for r in off:
                    ax.annotate(f"{r['config']}: {r['error']:.3g} (off scale)", (r["bits"], 50 * dense),
                                xytext=(4, -10), textcoords="offset points", fontsize=7)
            ax.set_title(m)
            ax.legend(fontsize=7)
        _common.save_figure(fig, _common.output_path(args, "sparse_quant.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
