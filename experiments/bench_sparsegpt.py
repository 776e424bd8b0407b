"""Wall time of SparseGPT on one layer (768x3072, 2048x2048; 2048 tokens) and on all of MiniLM.

Per layer shape: the first call's time and its compile time (tracing + XLA, counted by
``jax.monitoring``) are reported apart from the prune time, the median of ``--repeats`` warm calls.
MiniLM: sequential SparseGPT 50% on unpadded sentences (length buckets + token masks), with its
compile time and compilations. Runs on whatever JAX backend is present (CPU here); times depend on
the machine's load (recorded). Writes ``results/bench_sparsegpt.json``.

    jaxprune run bench_sparsegpt [--quick]
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from . import _common


def main(argv: list[str] | None = None) -> int:
    """Time the layer and the whole-model runs; print a table."""
    from tqdm.auto import tqdm

    from jaxprune.oneshot import LayerStats, SparseGPT

    ap = _common.parser("jaxprune run bench_sparsegpt", __doc__)
    ap.add_argument("--repeats", type=_common.positive_int, default=5)
    ap.add_argument("--tokens", type=_common.positive_int, default=2048)
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args(argv)
    shapes = [(256, 512)] if args.quick else [(768, 3072), (2048, 2048)]
    reps = 2 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    out = {"backend": jax.default_backend(), "tokens": args.tokens, "repeats": reps, "layers": []}
    for fin, fout in shapes:
        x = rng.normal(size=(args.tokens, fin)).astype(np.float32)
        st = LayerStats.from_inputs(x)
        w = rng.normal(size=(fin, fout)).astype(np.float32)
        for tgt in (0.5, "2:4"):
            sp, pat = (None, tgt) if isinstance(tgt, str) else (tgt, "unstructured")
            with _common.compile_stats() as c:
                t0 = time.perf_counter()
                jax.block_until_ready(SparseGPT()(w, st, sp, pattern=pat))  # first call: compiles
                first = time.perf_counter() - t0
            times = []
            for _ in tqdm(range(reps), desc=f"{fin}x{fout} {tgt}", leave=False):
                t0 = time.perf_counter()
                jax.block_until_ready(SparseGPT()(w, st, sp, pattern=pat))
                times.append(time.perf_counter() - t0)
            out["layers"].append({"shape": [fin, fout], "target": str(tgt),
                                  "median_s": float(np.median(times)), "times_s": times,
                                  "first_call_s": first, **c.as_dict()})
    if not (args.quick or args.skip_minilm):
        from jaxprune.oneshot import get_method, prune_sequential
        from jaxprune.zoo.data.text_tfds import stdlib_sentences
        from jaxprune.zoo.models import bert

        model, params, tok = bert.load_minilm()
        calib = bert.calibration_batches(tok, stdlib_sentences(600, "train"), batch=32)
        masks = [m for _, m in calib]
        with _common.compile_stats() as c:
            t0 = time.perf_counter()
            pruned, _ = prune_sequential(params, bert.blocks(model.cfg), calib, get_method("sparsegpt"),
                                         0.5, token_masks=masks, progress=False)
            jax.block_until_ready(pruned)
            out["minilm_total_s"] = time.perf_counter() - t0
        out["minilm_compile"] = c.as_dict()
        out["minilm_calib_tokens"] = int(sum(m.sum() for m in masks))
    out["loadavg_1min"] = os.getloadavg()[0]
    _common.write_json(_common.output_path(args, "bench_sparsegpt.json"), out)
    print(f"backend: {out['backend']}, {args.tokens} calibration tokens, median of {reps}")
    print(_common.format_table(
        [("layer (in x out)", "18s"), ("target", ">6s"), ("prune s", "9.3f"), ("1st call s", "10.2f"),
         ("compile s", "9.2f")],
        [(f"{r['shape'][0]}x{r['shape'][1]}", r["target"], r["median_s"], r["first_call_s"],
          r["total_compile_s"]) for r in out["layers"]]))
    if "minilm_total_s" in out:
        mc = out["minilm_compile"]
        print(f"whole MiniLM sequential SparseGPT 50% ({out['minilm_calib_tokens']} tokens): "
              f"{out['minilm_total_s']:.1f} s, of which compile {mc['total_compile_s']:.1f} s "
              f"({mc['compiles']} compilations)")
    print(f"load average (1 min): {out['loadavg_1min']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
