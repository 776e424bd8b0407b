"""Wall time of SparseGPT on one layer (768x3072, 2048x2048; 2048 tokens) and on all of MiniLM.

Median of ``--repeats`` runs after one warm-up (compile) run, on whatever JAX backend is present
(CPU here). Writes ``results/bench_sparsegpt.json``.

    jaxprune run bench_sparsegpt [--quick]
"""

from __future__ import annotations

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
        st = LayerStats(x.T @ x, x.sum(0), (x**2).sum(0), args.tokens, fin)
        w = rng.normal(size=(fin, fout)).astype(np.float32)
        for tgt in (0.5, "2:4"):
            sp, pat = (None, tgt) if isinstance(tgt, str) else (tgt, "unstructured")
            jax.block_until_ready(SparseGPT()(w, st, sp, pattern=pat))  # compile
            times = []
            for _ in tqdm(range(reps), desc=f"{fin}x{fout} {tgt}", leave=False):
                t0 = time.perf_counter()
                jax.block_until_ready(SparseGPT()(w, st, sp, pattern=pat))
                times.append(time.perf_counter() - t0)
            out["layers"].append({"shape": [fin, fout], "target": str(tgt),
                                  "median_s": float(np.median(times)), "times_s": times})
    if not (args.quick or args.skip_minilm):
        from jaxprune.oneshot import get_method, prune_sequential
        from jaxprune.zoo.data.text_tfds import stdlib_sentences
        from jaxprune.zoo.models import bert

        t0 = time.perf_counter()
        model, params, tok = bert.load_minilm()
        calib = bert.packed_calibration(tok, stdlib_sentences(600, "train"), 32, 32)
        pruned, _ = prune_sequential(params, bert.blocks(model.cfg), calib,
                                     get_method("sparsegpt"), 0.5, progress=False)
        jax.block_until_ready(pruned)
        out["minilm_total_s"] = time.perf_counter() - t0
        out["minilm_calib_tokens"] = int(sum(c[0].size for c in calib))
    _common.write_json(_common.output_path(args, "bench_sparsegpt.json"), out)
    print(f"backend: {out['backend']}, {args.tokens} calibration tokens, median of {reps}")
    print(f"{'layer (in x out)':18s} {'target':>6s} {'median s':>9s}")
    for r in out["layers"]:
        print(f"{str(r['shape'][0]) + 'x' + str(r['shape'][1]):18s} {r['target']:>6s} {r['median_s']:9.2f}")
    if "minilm_total_s" in out:
        print(f"whole MiniLM SparseGPT 50% (load+calibrate+prune): {out['minilm_total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
