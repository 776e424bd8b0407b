"""The trained byte GPT with 20% / 40% of attention heads + FFN units removed (magnitude vs Taylor vs
FLAP with/without bias compensation) and 25% of layers removed (angular distance / block influence
vs dropping the last layers): held-out perplexity, parameter counts, no fine-tuning.

The model is the GPT of ``train_gpt`` (:mod:`jaxprune.zoo.models.gpt`, loaded from
``results/gpt_params.msgpack``, trained first if absent), evaluated on the same held-out validation
records and calibrated on the same train records as ``oneshot_gpt``. Head and FFN groups come from
tracing the model (:func:`jaxprune.structured.discover_groups`); a slimmed model is again a
:class:`~jaxprune.zoo.models.gpt.GPT` with per-layer head counts / FFN widths
(:func:`~jaxprune.zoo.models.gpt.config_from_params`), and its perplexity is checked against the masked
full-size model's.

    python -m experiments.structured_gpt            # results/structured_gpt.{csv,json,png}
    python -m experiments.structured_gpt --quick    # smoke run -> results/structured_gpt_quick.*
    jaxprune run structured_gpt [--quick]           # the same through the CLI
"""

from __future__ import annotations

import time

import numpy as np

from . import _common

METHODS = [("magnitude", "l2", False), ("taylor", "taylor", False), ("flap", "flap", False),
           ("flap+bias", "flap", True)]


def head_ffn_groups(groups: list) -> tuple[list, list]:
    """``(head groups, FFN groups)`` of a traced :class:`~jaxprune.zoo.models.gpt.GPT`.

    A head group owns the leading (head) factor of ``o_proj``'s input axis (with q/k/v columns and
    biases); an FFN group owns ``fc2``'s input axis (with the ``fc1`` column and bias). The per-head
    dimension groups and the (inexact) residual stream are left out.
    """
    heads, ffn = [], []
    for g in groups:
        if not g.exact:
            continue
        for m in g.members:
            if m.path.endswith("o_proj/kernel") and m.axis == 0 and len(m.sizes) > 1 and m.pos == 0:
                heads.append(g)
                break
            if m.path.endswith("fc2/kernel") and m.axis == 0:
                ffn.append(g)
                break
    return heads, ffn


def main(argv: list[str] | None = None) -> int:
    """Prune the trained GPT several ways, evaluate; print a table and write results."""
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jaxprune.core.masks import apply_masks
    from jaxprune.structured import (
        block_scores,
        choose_blocks,
        choose_units,
        compensate_bias,
        discover_groups,
        drop_blocks,
        group_masks,
        group_scores,
        input_stats,
        param_count,
        slim,
    )
    from jaxprune.zoo.data import text_tfds
    from jaxprune.zoo.models.gpt import GPT, config_from_params, loss_fn, perplexity

    from .train_gpt import VAL_RECORDS, load_or_train

    ap = _common.parser("jaxprune run structured_gpt", __doc__)
    ap.add_argument("--ratios", type=_common.unit_fraction, nargs="+", default=None,
                    help="default 0.2 0.4")
    ap.add_argument("--calib", type=_common.positive_int, default=64,
                    help="calibration records (train split)")
    ap.add_argument("--eval", type=_common.positive_int, default=256,
                    help="held-out records (as oneshot_gpt)")
    ap.add_argument("--allocation", choices=["uniform", "global"], default="uniform",
                    help="uniform: every layer loses the same share of heads / FFN units; "
                         "global: one threshold over all layers' (standardised) head scores, "
                         "another over FFN scores")
    a = ap.parse_args(argv)
    t_start = time.time()
    cfg, params, info = load_or_train(quick=a.quick, results=a.results_dir)
    model = GPT(cfg)
    v = {"params": params}
    tr = text_tfds.load_split("train")[:, : cfg.seq + 1]
    va = text_tfds.load_split("validation")[:VAL_RECORDS, : cfg.seq + 1]
    n_cal, n_ev = (16, 32) if a.quick else (a.calib, a.eval)
    ratios = a.ratios or ([0.2] if a.quick else [0.2, 0.4])
    cal_rec = tr[np.random.default_rng(1).choice(len(tr), n_cal, replace=False)]  # as oneshot_gpt
    calib = [cal_rec[i:i + 8, :-1].astype(np.int32) for i in range(0, n_cal, 8)]
    ev = va[:n_ev]
    ppl0 = perplexity(model, params, ev)
    n0 = param_count(params)

    groups = discover_groups(model.apply, v, jnp.zeros((1, cfg.seq), jnp.int32))
    heads, ffn = head_ffn_groups(groups)
    if len(heads) != cfg.layers or len(ffn) != cfg.layers:
        raise RuntimeError(f"expected {cfg.layers} head and FFN groups, traced {len(heads)} / "
                           f"{len(ffn)}; declare them with jaxprune.structured.declare_groups")
    prunable = heads + ffn
    stats = input_stats(model, v, calib)
    grads = None
    for i in range(0, n_cal, 8):
        g = jax.grad(lambda p, r: loss_fn(model, p, r))(params, cal_rec[i:i + 8].astype(np.int32))
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    grads = {"params": grads}
    consumers = sorted({m.path for g in prunable for m in g.members
                        if m.path.endswith(("o_proj/kernel", "fc2/kernel")) and m.axis == 0})
    means = {p: stats[p].mean for p in consumers}

    def counts(p: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
        c = config_from_params(cfg, p)
        return tuple(c.layer(i)[0] for i in range(c.layers)), tuple(c.layer(i)[1]
                                                                   for i in range(c.layers))

    rows = [{"kind": "dense", "method": "-", "ratio": 0.0, "params": n0, "ppl": ppl0,
             "ppl_masked": ppl0, "heads": str(counts(params)[0]), "ffn": str(counts(params)[1]),
             "seconds": 0.0, "notes": ""}]
    score_cache: dict[str, dict] = {}
    rounding_notes: dict[float, list[str]] = {}
    jobs = [(r, m) for r in ratios for m in METHODS]
    for r, (label, crit, comp) in tqdm(jobs, desc="heads+ffn"):
        t0 = time.time()
        if crit not in score_cache:
            score_cache[crit] = group_scores(v, prunable, crit, grads=grads, stats=stats)
        sc = score_cache[crit]
        sh = choose_units(sc, heads, r, allocation=a.allocation)
        sf = choose_units(sc, ffn, r, allocation=a.allocation)
        keep = {**sh.keep, **sf.keep}
        vv = compensate_bias(v, prunable, keep, means) if comp else v
        sv = slim(vv, prunable, keep)
        scfg = config_from_params(cfg, sv)
        ppl = perplexity(GPT(scfg), sv["params"], ev)
        secs = time.time() - t0
        masked = apply_masks(vv, group_masks(vv, prunable, keep))
        ppl_m = perplexity(model, masked["params"], ev)
        h, f = counts(sv["params"])
        notes = (f"removed {1 - sum(h) / (cfg.heads * cfg.layers):.1%} of heads, "
                 f"{1 - sum(f) / (cfg.mlp * cfg.d * cfg.layers):.1%} of FFN units")
        rows.append({"kind": "heads+ffn", "method": label, "ratio": r,
                     "params": param_count(sv["params"]), "ppl": ppl, "ppl_masked": ppl_m,
                     "heads": str(h), "ffn": str(f), "seconds": round(secs, 2), "notes": notes})
        if r not in rounding_notes:  # choose_units' notes on whole-unit rounding (first layer's)
            rounding_notes[r] = sh.notes[:1] + sf.notes[:1]

    bs = block_scores(model.apply, v, calib, pattern=r"^block_(\d+)$")
    n_drop = max(1, int(round(0.25 * cfg.layers)))
    for metric in ("angular", "influence", "last"):
        t0 = time.time()
        rm = choose_blocks(bs, n_drop, metric)
        sv = drop_blocks(v, rm, prefix="block_")
        scfg = config_from_params(cfg, sv)
        ppl = perplexity(GPT(scfg), sv["params"], ev)
        h, f = counts(sv["params"])
        rows.append({"kind": "layers", "method": metric, "ratio": n_drop / cfg.layers,
                     "params": param_count(sv["params"]), "ppl": ppl, "ppl_masked": float("nan"),
                     "heads": str(h), "ffn": str(f), "seconds": round(time.time() - t0, 2),
                     "notes": f"removed blocks {rm}"})

    # reference for the layer metrics: perplexity without each single block
    drop_each = []
    for s in bs:
        sv = drop_blocks(v, [s.index], prefix="block_")
        drop_each.append(perplexity(GPT(config_from_params(cfg, sv)), sv["params"], ev))

    hf = [row for row in rows if row["kind"] == "heads+ffn"]
    gap = max((abs(row["ppl"] - row["ppl_masked"]) / row["ppl_masked"] for row in hf), default=0.0)
    total = time.time() - t_start
    print(f"GPT d={cfg.d}, {cfg.layers} layers x {cfg.heads} heads, FFN {cfg.mlp * cfg.d}; "
          f"{n_cal} calibration / {n_ev} held-out records of {cfg.seq} bytes; "
          f"{a.allocation} allocation")
    print("block scores: " + ", ".join(f"{s.index}: ang {s.angular:.3f} / inf {s.influence:.3f}"
                                       for s in bs))
    print(_common.format_table(
        [("kind", "<10"), ("method", "<10"), ("ratio", ">5.2f"), ("params", ">8d"), ("ppl", ">9.3f"),
         ("masked", ">9.3f"), ("heads", "<14"), ("ffn", "<22"), ("notes", "")],
        [(row["kind"], row["method"], row["ratio"], row["params"], row["ppl"], row["ppl_masked"],
          row["heads"], row["ffn"], row["notes"]) for row in rows]))
    print("perplexity without one block: " + ", ".join(f"{s.index}: {q:.3f}"
                                                      for s, q in zip(bs, drop_each, strict=True)))
    for r, ns in rounding_notes.items():
        print(f"ratio {r}: " + "; ".join(ns))
    print(f"slim vs masked perplexity: max relative difference {gap:.2e}; total {total:.0f} s")
    _common.write_csv(_common.output_path(a, "structured_gpt.csv"), rows)
    meta = {"gpt": info, "config": cfg._asdict(), "calib_records": n_cal, "eval_records": n_ev,
            "seq": cfg.seq, "allocation": a.allocation, "ratios": ratios,
            "slim_vs_masked_max_rel_diff": gap, "total_seconds": round(total, 1),
            "device": str(jax.devices()[0]),
            "block_scores": [s._asdict() for s in bs],
            "ppl_without_block": dict(enumerate(drop_each)),
            "rounding_notes": {str(r): ns for r, ns in rounding_notes.items()}}
    _common.write_json(_common.output_path(a, "structured_gpt.json"), {"meta": meta, "rows": rows},
                       default=str)
    with _common.optional_plot("structured_gpt.png"):
        fig, ax = _common.figure((6, 4))
        for label, _, _ in METHODS:
            rs = [row for row in hf if row["method"] == label]
            ax.plot([n0] + [row["params"] for row in rs], [ppl0] + [row["ppl"] for row in rs],
                    "o-", label=f"heads+FFN: {label}")
        lrows = [row for row in rows if row["kind"] == "layers"]
        for row, mk, ms in zip(lrows, "s^v", (11, 8, 5), strict=True):  # often the same point
            ax.plot([row["params"]], [row["ppl"]], mk, ms=ms, ls="none", mfc="none", mew=1.5,
                    label=f"{row['ratio']:.0%} layers: {row['method']} {row['notes'][8:]}")
        ax.axhline(ppl0, color="k", ls="--", lw=0.8, label="dense")
        ax.set_xlabel("parameters")
        ax.set_ylabel("held-out byte perplexity")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
        _common.save_figure(fig, _common.output_path(a, "structured_gpt.png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
