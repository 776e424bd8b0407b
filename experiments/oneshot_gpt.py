"""One-shot pruning of the trained byte GPT: magnitude/Wanda/SparseGPT/DSnoT/OBS, perplexity table.

Calibration: records of the train split of the stdlib corpus; perplexity on held-out validation
records. Every method runs through the sequential driver (blocks fed the pruned blocks' outputs).
Also: uniform vs OWL allocation at 70%, and per-layer reconstruction error ‖WX−ŴX‖²/‖WX‖² of
block 0 (dense inputs) including exact OBS.

    jaxprune run oneshot_gpt [--quick]
"""

from __future__ import annotations

import time

import numpy as np

from . import _common

METHODS = ["magnitude", "wanda", "sparsegpt", "wanda+dsnot", "sparsegpt+dsnot"]
TARGETS: list = [0.5, 0.6, 0.7, "2:4", "4:8"]


def main(argv: list[str] | None = None) -> int:
    """Run the study and print the perplexity tables."""
    from tqdm.auto import tqdm

    from jaxprune.oneshot import calibrate, get_method, owl_sparsities, prune_sequential, recon_error
    from jaxprune.oneshot.sequential import get_path
    from jaxprune.zoo.data import text_tfds
    from jaxprune.zoo.models.gpt import GPT, blocks, perplexity

    from .train_gpt import VAL_RECORDS, load_or_train

    ap = _common.parser("jaxprune run oneshot_gpt", __doc__)
    ap.add_argument("--calib", type=_common.positive_int, default=64, help="calibration records")
    ap.add_argument("--eval", type=_common.positive_int, default=256, help="held-out records")
    args = ap.parse_args(argv)
    cfg, params, info = load_or_train(quick=args.quick, results=args.results_dir)
    model = GPT(cfg)
    tr = text_tfds.load_split("train")[:, : cfg.seq + 1]
    va = text_tfds.load_split("validation")[:VAL_RECORDS, : cfg.seq + 1]
    n_cal, n_ev = (16, 64) if args.quick else (args.calib, args.eval)
    cal = tr[np.random.default_rng(1).choice(len(tr), n_cal, replace=False), :-1].astype(np.int32)
    calib = [cal[i:i + 8] for i in range(0, n_cal, 8)]
    ev = va[:n_ev]
    methods = METHODS[:3] if args.quick else METHODS
    targets = [0.5, "2:4"] if args.quick else TARGETS
    rows = [{"method": "dense", "target": "-", "allocation": "-", "ppl": perplexity(model, params, ev),
             "seconds": 0.0}]
    runs = [(m, t, "uniform") for t in targets for m in methods]
    runs += [(m, 0.7, "owl") for m in ("wanda", "sparsegpt")] if not args.quick else []
    dense_stats = None
    for meth, tgt, alloc in tqdm(runs, desc="oneshot_gpt"):
        sparsities = None
        if alloc == "owl":
            if dense_stats is None:
                dense_stats = calibrate(model, params, calib, gram=False)
            ks = {k: get_path(params, k) for k in dense_stats if k.startswith("block_")}
            sparsities = owl_sparsities(ks, {k: dense_stats[k] for k in ks}, 0.7,
                                        group=r"block_\d+")
        t0 = time.time()
        sp, pat = (None, tgt) if isinstance(tgt, str) else (tgt, "unstructured")
        pruned, _ = prune_sequential(params, blocks(cfg), calib, get_method(meth), sp, pattern=pat,
                                     sparsities=sparsities, progress=False)
        secs = time.time() - t0
        rows.append({"method": meth, "target": str(tgt), "allocation": alloc,
                     "ppl": perplexity(model, pruned, ev), "seconds": round(secs, 2)})
    # layer-level reconstruction error on block 0 (dense inputs), including exact OBS
    st = calibrate(model, params, calib)
    layer_rows = []
    for path in [k for k in st if k.startswith("block_0/")]:
        w = np.asarray(get_path(params, path))
        for meth in ["magnitude", "wanda", "sparsegpt", "obs", "sparsegpt+dsnot"]:
            q, _ = get_method(meth)(w, st[path], 0.5, name=path)
            layer_rows.append({"layer": path, "method": meth,
                               "rel_error": recon_error(w, np.asarray(q), st[path].hessian)})
    _common.write_csv(_common.output_path(args, "oneshot_gpt.csv"), rows)
    _common.write_json(_common.output_path(args, "oneshot_gpt.json"),
                       {"gpt": info, "calib_records": n_cal, "eval_records": n_ev, "rows": rows,
                        "layer_errors": layer_rows, "quick": args.quick})
    print(_common.format_table(
        [("method", "16s"), ("target", ">6s"), ("alloc", ">8s"), ("ppl", "8.3f"), ("sec", "6.1f")],
        [(r["method"], r["target"], r["allocation"], r["ppl"], r["seconds"]) for r in rows]))
    print(f"\n{'layer (50%)':22s} " + " ".join(f"{m:>15s}" for m in
                                                 ["magnitude", "wanda", "sparsegpt", "obs",
                                                  "sparsegpt+dsnot"]))
    for path in dict.fromkeys(r["layer"] for r in layer_rows):
        errs = [r["rel_error"] for r in layer_rows if r["layer"] == path]
        print(f"{path:22s} " + " ".join(f"{e:15.4f}" for e in errs))
    with _common.optional_plot("oneshot_gpt.png"):
        fig, ax = _common.figure((6, 4))
        for meth in methods:
            xs = [float(r["target"]) for r in rows if r["method"] == meth
                  and r["allocation"] == "uniform" and ":" not in r["target"]]
            ys = [r["ppl"] for r in rows if r["method"] == meth and r["allocation"] == "uniform"
                  and ":" not in r["target"]]
            ax.plot(xs, ys, "o-", label=meth)
        ax.axhline(rows[0]["ppl"], color="k", ls="--", label="dense")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("held-out byte perplexity")
        ax.set_yscale("log")
        ax.legend()
        _common.save_figure(fig, _common.output_path(args, "oneshot_gpt.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
