"""One-shot pruning of all-MiniLM-L6-v2: embedding cosine and retrieval agreement vs dense.

Calibration: stdlib docstring sentences (train files), each sentence its own sequence, packed into
rows of one length with segment ids (attention stays within a sentence, positions restart; padding
counts in no statistic); evaluation: held-out sentences
(validation files). Methods at 50% and 2:4 through the sequential driver. Metrics: mean
cosine(pruned, dense) embedding, and the fraction of sentences whose nearest neighbour (cosine,
excluding itself) is the same as under the dense model.

    jaxprune run oneshot_minilm [--quick]
"""

from __future__ import annotations

import time

import numpy as np

from . import _common

METHODS = ["magnitude", "wanda", "sparsegpt", "wanda+dsnot", "sparsegpt+dsnot"]


def nn_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows whose nearest other row (cosine) is the same in ``a`` and ``b``."""
    def nn(x: np.ndarray) -> np.ndarray:
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    return float(np.mean(nn(a) == nn(b)))


def main(argv: list[str] | None = None) -> int:
    """Run the study and print the table."""
    from tqdm.auto import tqdm

    from jaxprune.oneshot import get_method, prune_sequential
    from jaxprune.zoo.data.text_tfds import stdlib_sentences
    from jaxprune.zoo.models import bert

    ap = _common.parser("jaxprune run oneshot_minilm", __doc__)
    ap.add_argument("--calib-sentences", type=_common.positive_int, default=600)
    ap.add_argument("--eval-sentences", type=_common.positive_int, default=200)
    ap.add_argument("--batch", type=_common.positive_int, default=32,
                    help="calibration batch (packed rows)")
    args = ap.parse_args(argv)
    model, params, tok = bert.load_minilm()
    n_cal, n_ev = (160, 48) if args.quick else (args.calib_sentences, args.eval_sentences)
    calib = bert.calibration_batches(tok, stdlib_sentences(n_cal, "train"), args.batch, pack=True)
    token_masks = [m for _, m in calib]
    texts = stdlib_sentences(n_ev, "validation")
    dense = bert.embed_texts(model, params, tok, texts)
    methods = METHODS[:3] if args.quick else METHODS
    rows = []
    for tgt in tqdm([0.5, "2:4"], desc="targets"):
        for meth in methods:
            t0 = time.time()
            sp, pat = (None, tgt) if isinstance(tgt, str) else (tgt, "unstructured")
            pruned, _ = prune_sequential(params, bert.blocks(model.cfg), calib, get_method(meth),
                                         sp, pattern=pat, token_masks=token_masks, progress=False)
            secs = time.time() - t0
            emb = bert.embed_texts(model, pruned, tok, texts)
            rows.append({"method": meth, "target": str(tgt),
                         "cosine": float((emb * dense).sum(1).mean()),
                         "nn_agreement": nn_agreement(dense, emb), "seconds": round(secs, 1)})
    _common.write_csv(_common.output_path(args, "oneshot_minilm.csv"), rows)
    ntok = int(sum(m.sum() for m in token_masks))
    _common.write_json(_common.output_path(args, "oneshot_minilm.json"),
                       {"calib_tokens": ntok, "calib_sentences": n_cal, "eval_sentences": n_ev,
                        "calib_shapes": sorted({tuple(int(d) for d in c[0].shape) for c in calib}),
                        "rows": rows,
                        "quick": args.quick})
    print(f"calibration: {n_cal} sentences, {ntok} tokens (no padding); held-out sentences: {n_ev}")
    print(_common.format_table(
        [("method", "16s"), ("target", ">6s"), ("cosine", "8.4f"), ("NN agree", "9.3f"), ("sec", "6.1f")],
        [(r["method"], r["target"], r["cosine"], r["nn_agreement"], r["seconds"]) for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
