"""Structured pruning of Gemma 3 270M (Q4_K_M GGUF, dequantized): query heads + FFN units removed
(L2 / Taylor / FLAP, FLAP with bias compensation), and whole blocks removed (angular distance, block
influence, the last blocks, and the best blocks found by removing each of the 18 in turn).

Setup as ``oneshot_gemma`` (:mod:`experiments._gemma`): the ``llm`` extra ships the model, Debian's
``python3.11-doc`` the text; the dense baseline is the Q4_K_M model dequantized to float32, under
the Gemma Terms of Use (shipped inside that package).

Heads and FFN units: the groups come from tracing the model (:func:`jaxprune.structured.discover_groups`
on ``Gemma.apply``): per layer one query-head group (``q_einsum`` axis 0 with ``attn_vec_einsum``
axis 0, 4 units) and one FFN group (``gating_einsum`` axis 1 -- gate and up together -- with
``linear`` axis 0, 2048 units). Gemma 3 270M has 1 KV head per layer: a KV group is the whole
attention of the layer (all 4 query heads share it), so it is not a unit this experiment removes;
query heads are, 1 of 4 per layer for 20% (25% after whole-unit rounding) and 2 of 4 for 40%.
FLAP bias compensation needs a bias to fold the removed units' mean contribution into; Gemma has
none, so the model carries an optional zero ``bias`` after ``attn_vec_einsum`` and ``linear``
(``GemmaConfig(out_bias=True)``, :func:`~jaxprune.zoo.models.gemma.with_out_bias`), which the
compensation fills. The slimmed params run as a smaller ``Gemma`` (per-layer head counts / FFN widths,
:func:`~jaxprune.zoo.models.gemma.config_from_params`); for one configuration the slim model's logits
are compared with the masked full-size model's.

Blocks: :func:`~jaxprune.structured.block_scores` on the calibration windows,
:func:`~jaxprune.structured.choose_blocks`, then :func:`~jaxprune.structured.drop_blocks` with
``renumber=False`` and ``Gemma(cfg, keep_layers=...)``, so each kept block keeps its local/global
attention type. The single-block sweep evaluates the model without each block on ``--sweep-eval``
test windows.

    jaxprune run structured_gemma [--quick] [--calib 32] [--eval 16] [--ratios 0.2 0.4] [--drop 3]
                                  [--sweep-eval 8] [--allocation uniform|global]
"""

from __future__ import annotations

import time

import numpy as np

from . import _common, _gemma

# (label, group_scores criterion, FLAP bias compensation)
METHODS = [("l2", "l2", False), ("taylor", "taylor", False), ("flap", "flap", False),
           ("flap+bias", "flap", True)]


def head_ffn_groups(groups: list) -> tuple[list, list, list]:
    """``(KV groups, query-head groups, FFN groups)`` among the traced groups of a :class:`Gemma`.

    A KV group owns a kv head (``kv_einsum`` axis 1) with its query heads (the leading factor of
    ``q_einsum`` / ``attn_vec_einsum`` axis 0); a query-head group owns one query head in every kv
    group (the trailing factor; all of axis 0 when there is 1 kv head, which forms no group of its
    own); an FFN group owns ``mlp/linear`` axis 0 with ``gating_einsum`` axis 1.
    """
    kv, heads, ffn = [], [], []
    for g in groups:
        if not g.exact:
            continue
        if any(m.path.endswith("attn/kv_einsum") and m.axis == 1 for m in g.members):
            kv.append(g)
        elif any(m.path.endswith("attn/attn_vec_einsum") and m.axis == 0 for m in g.members):
            heads.append(g)
        elif any(m.path.endswith("mlp/linear") and m.axis == 0 for m in g.members):
            ffn.append(g)
    return kv, heads, ffn


def main(argv: list[str] | None = None) -> int:
    """Prune Gemma structurally several ways; print the tables, write results."""
    import jax
    import jax.numpy as jnp

    from jaxprune import structured as sx
    from jaxprune.core.masks import apply_masks
    from jaxprune.structured.importance import gqa_note
    from jaxprune.zoo.models.gemma import Gemma, config_from_params, nll_sum, perplexity, with_out_bias

    ap = _common.parser("jaxprune run structured_gemma", __doc__)
    _gemma.add_size_flags(ap, calib=32)
    ap.add_argument("--ratios", type=_common.unit_fraction, nargs="+", default=None,
                    help="fractions of query heads and FFN units removed (default 0.2 0.4)")
    ap.add_argument("--allocation", choices=["uniform", "global"], default="uniform",
                    help="uniform: every layer loses the same share; global: one threshold over "
                         "standardised scores of all layers (heads and FFN separately)")
    ap.add_argument("--drop", type=_common.positive_int, nargs="+", default=[3],
                    help="numbers of blocks to remove (default 3)")
    ap.add_argument("--sweep-eval", type=_common.nonnegative_int, default=8,
                    help="test windows for the remove-each-block sweep (0: skip the sweep)")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib, args.seq, args.eval, args.eval_seq, args.gen, args.sweep_eval = 4, 64, 2, 64, 4, 2
    ratios = args.ratios or ([0.2] if args.quick else [0.2, 0.4])
    s = _gemma.setup(args, "structured_gemma")
    if isinstance(s, int):
        return s
    model, params, cfg = s.model, s.params, s.model.cfg
    t_start = time.time()
    info = {**s.info, "load_average_start": _gemma.load_average(), "ratios": ratios,
            "allocation": args.allocation}
    rows: list[dict] = []
    csv_path = _common.output_path(args, "structured_gemma.csv")
    json_path = _common.output_path(args, "structured_gemma.json")
    emb = int(np.size(params["embedder"]["input_embedding"]))

    def save() -> None:
        _common.write_csv(csv_path, rows)
        _common.write_json(json_path, {"info": info, "rows": rows}, default=str)

    def row(kind: str, method: str, ratio: float, m: Gemma, p: dict, secs: float, notes: str = "",
            ev: np.ndarray | None = None, record: bool = True) -> float:
        with _common.peak_rss() as mem:
            t0 = time.time()
            ppl = perplexity(m, p, s.ev if ev is None else ev)
            ev_s = time.time() - t0
        kept = m.keep_layers or range(cfg.layers)
        n = sx.param_count({k: v for k, v in p.items() if k == "embedder" or
                         k.startswith("layer_") and int(k.split("_")[1]) in kept or
                         not k.startswith("layer_")})
        r = {"kind": kind, "method": method, "ratio": round(ratio, 4), "params": n,
             "non_embedding_params": n - emb, "ppl": round(ppl, 4), "prune_s": round(secs, 1),
             "eval_s": round(ev_s, 1), "peak_rss_mb": round(mem.mb),
             "heads": " ".join(str(m.cfg.heads_at(i)) for i in kept),
             "ffn": " ".join(str(m.cfg.ffn_at(i)) for i in kept), "notes": notes,
             "load1": (_gemma.load_average() or [""])[0]}
        if record:
            rows.append(r)
            save()
        print(f"{kind:9s} {method:18s} {ratio:5.2f} params {n:>11,d} (blocks {n - emb:>10,d}) "
              f"ppl {ppl:10.3f}  {secs:6.1f}s + eval {ev_s:5.1f}s  {notes}", flush=True)
        return ppl

    ppl0 = row("dense", "-", 0.0, model, params, 0.0)
    fn = lambda p, t: model.apply({"params": p}, t, hidden=True)  # noqa: E731
    v = {"params": params}
    t0 = time.time()
    groups = sx.discover_groups(model.apply, v, jnp.zeros((1, 8), jnp.int32))
    kvg, heads, ffn = head_ffn_groups(groups)
    info["kv_groups"] = len(kvg)
    if len(heads) != cfg.layers or len(ffn) != cfg.layers:
        raise RuntimeError(f"structured_gemma: expected {cfg.layers} head and FFN groups, traced "
                           f"{len(heads)} / {len(ffn)}")
    prunable = heads + ffn
    info["groups_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    stats = sx.input_stats(fn, v, s.batches)
    info["input_stats_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    gfn = jax.jit(jax.grad(lambda p, b: nll_sum(model, p, b)))
    grads = None
    for b in s.batches:
        g = gfn(params, jnp.asarray(b))
        g = {k: x for k, x in g.items() if k.startswith("layer_")}  # the 262k embedding's grad unused
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    grads = {"params": grads}
    info["taylor_grads_s"] = round(time.time() - t0, 1)
    print(f"traced {len(heads)} head + {len(ffn)} FFN groups in {info['groups_s']}s; input stats "
          f"{info['input_stats_s']}s, Taylor gradients {info['taylor_grads_s']}s", flush=True)
    consumers = sorted({m.path for g in prunable for m in g.members
                        if m.path.endswith(("attn_vec_einsum", "mlp/linear")) and m.axis == 0})
    means = {p: stats[p].mean for p in consumers}
    # FLAP scores a unit by its consumers' input variance x squared weights; the producers
    # (q_einsum (N, D, H): fan-in D is not a leading axis) carry no statistic it uses
    stats = {p: stats[p] for p in consumers}
    vb = {"params": with_out_bias(params)}
    info["gqa"] = {str(r): gqa_note(cfg.heads, cfg.kv_heads, r) for r in ratios}
    info["kv_note"] = (
        f"{cfg.kv_heads} KV head per layer shared by all {cfg.heads} query heads: a KV group is the "
        "whole attention of a layer (not traced as a group), so query heads are the removable unit"
        if cfg.kv_heads == 1 else
        f"{cfg.kv_heads} KV heads per layer ({len(kvg)} KV groups traced, not removed here); a "
        f"query-head unit is one query head in each KV group")
    score_cache: dict[str, dict] = {}
    kept_for_gen: dict[str, tuple] = {}
    check: dict = {}
    for r in ratios:
        for label, crit, comp in METHODS:
            t0 = time.time()
            if crit not in score_cache:
                score_cache[crit] = sx.group_scores(v, prunable, crit, grads=grads, stats=stats)
            sc = score_cache[crit]
            sh = sx.choose_units(sc, heads, r, allocation=args.allocation)
            sf = sx.choose_units(sc, ffn, r, allocation=args.allocation)
            keep = {**sh.keep, **sf.keep}
            vv = sx.compensate_bias(vb, prunable, keep, means) if comp else v
            sv = sx.slim(vv, prunable, keep)
            scfg = config_from_params(cfg, sv["params"])
            secs = time.time() - t0
            h = sum(scfg.heads_at(i) for i in range(cfg.layers))
            f = sum(scfg.ffn_at(i) for i in range(cfg.layers))
            notes = (f"removed {1 - h / (cfg.heads * cfg.layers):.1%} of query heads, "
                     f"{1 - f / (cfg.ffn * cfg.layers):.1%} of FFN units")
            row("heads+ffn", label, r, Gemma(scfg), sv["params"], secs, notes)
            if comp and r == ratios[0]:
                kept_for_gen[f"flap+bias {r:.0%}"] = (Gemma(scfg), sv["params"])
                # the slim model is the masked full-size model (same function, smaller shapes)
                masked = apply_masks(vv, sx.group_masks(vv, prunable, keep))["params"]
                x = jnp.asarray(s.ev[:1, :64])
                a = np.asarray(Gemma(scfg).apply({"params": sv["params"]}, x, hidden=True))
                b = np.asarray(model.clone(cfg=config_from_params(cfg, masked)).apply(
                    {"params": masked}, x, hidden=True))
                check = {"config": f"{label} {r}", "max_abs_diff_final_hidden": float(np.abs(a - b).max()),
                         "max_abs_final_hidden": float(np.abs(b).max())}
                print(f"slim vs masked ({label} {r}): max |diff| of final hidden states "
                      f"{check['max_abs_diff_final_hidden']:.2e} "
                      f"(max |h| {check['max_abs_final_hidden']:.1f})", flush=True)
    info["slim_vs_masked"] = check
    del stats, grads, score_cache

    t0 = time.time()
    bs = sx.block_scores(lambda vv, t: model.apply(vv, t, hidden=True), v, s.batches,
                      pattern=r"^layer_(\d+)$")
    score_s = time.time() - t0
    info["block_scores"] = [b._asdict() for b in bs]
    info["block_scores_s"] = round(score_s, 1)
    sweep: dict[int, float] = {}
    if args.sweep_eval:
        sev = s.ev[:args.sweep_eval]
        sweep_ppl0 = row("sweep", "dense", 0.0, model, params, 0.0, "", ev=sev, record=False)
        for i in range(cfg.layers):
            keep = tuple(j for j in range(cfg.layers) if j != i)
            sweep[i] = row("sweep", f"without block {i}", 1 / cfg.layers, Gemma(cfg, keep_layers=keep),
                           sx.drop_blocks(params, [i], prefix="layer_", renumber=False), 0.0,
                           "global" if cfg.is_global(i) else "local", ev=sev, record=False)
        info["sweep"] = {"eval_windows": int(len(sev)), "dense_ppl": sweep_ppl0,
                         "ppl_without_block": {str(i): round(q, 4) for i, q in sweep.items()}}
        depth = np.arange(cfg.layers)
        info["sweep"]["spearman_depth_vs_ppl"] = float(np.corrcoef(
            np.argsort(np.argsort(depth)), np.argsort(np.argsort([sweep[i] for i in depth])))[0, 1])
    metrics = ["angular", "influence", "last"] + (["sweep"] if sweep else [])
    for n in args.drop:
        for metric in metrics:
            t0 = time.time()
            gone = (sorted(sorted(sweep, key=lambda i: (sweep[i], i))[:n]) if metric == "sweep"
                    else sx.choose_blocks(bs, n, metric))
            keep = tuple(i for i in range(cfg.layers) if i not in gone)
            dropped = sx.drop_blocks(params, gone, prefix="layer_", renumber=False)
            label = f"{metric}" if metric != "sweep" else "best single blocks (sweep)"
            q = row("blocks", label, n / cfg.layers, Gemma(cfg, keep_layers=keep), dropped,
                    time.time() - t0 + (score_s if metric in ("angular", "influence") else 0.0),
                    f"removed blocks {gone}")
            if metric == "angular" and n == args.drop[0]:
                kept_for_gen[f"drop {n} by angular"] = (Gemma(cfg, keep_layers=keep), dropped)
            del q
    if args.gen:
        info["generations"] = _gemma.generations(s, {"dense": (model, params), **kept_for_gen}, args.gen,
                                                 _gemma.PROMPTS[:1] if args.quick else None)
    info["total_s"] = round(time.time() - t_start, 1)
    info["load_average_end"] = _gemma.load_average()
    save()

    print(f"\nGemma 3 270M: {len(s.cal)} calibration windows of {args.seq}, {len(s.ev)} test windows of "
          f"{args.eval_seq}; {args.allocation} allocation; {info['kv_note']}")
    print("block scores: " + ", ".join(f"{b.index}: ang {b.angular:.3f}/inf {b.influence:.3f}" for b in bs))
    if sweep:
        print(f"perplexity without one block ({args.sweep_eval} windows): "
              + ", ".join(f"{i}: {q:.2f}" for i, q in sweep.items()))
    print(f"\n{'kind':9s} {'method':26s} {'ratio':>5s} {'params':>11s} {'blocks':>11s} {'ppl':>10s}  notes")
    for r in rows:
        print(f"{r['kind']:9s} {r['method']:26s} {r['ratio']:5.2f} {r['params']:11,d} "
              f"{r['non_embedding_params']:11,d} {r['ppl']:10.3f}  {r['notes']}")
    _gemma.print_generations(info.get("generations", []))
    with _common.optional_plot("structured_gemma.png"):
        fig, (a1, a2) = _common.figure((11, 4), ncols=2)
        hf = [r for r in rows if r["kind"] == "heads+ffn"]
        base = rows[0]["non_embedding_params"]
        for label, _, _ in METHODS:
            rs = [r for r in hf if r["method"] == label]
            a1.plot([base] + [r["non_embedding_params"] for r in rs], [ppl0] + [r["ppl"] for r in rs],
                    "o-", label=f"heads+FFN: {label}")
        for r, mk in zip([r for r in rows if r["kind"] == "blocks"], "s^vDs^vD" * 4, strict=False):
            a1.plot([r["non_embedding_params"]], [r["ppl"]], mk, mfc="none", ls="none",
                    label=f"blocks: {r['method']} {r['notes'][8:]}")
        a1.set_yscale("log")
        a1.invert_xaxis()
        a1.set_xlabel("non-embedding parameters")
        a1.set_ylabel("test perplexity")
        a1.legend(fontsize=6)
        if sweep:
            a2.plot(list(sweep), list(sweep.values()), "o-", label="ppl without block (sweep)")
            a2.axhline(info["sweep"]["dense_ppl"], color="k", ls=":", lw=1, label="dense")
            a2.set_yscale("log")
            a2.set_xlabel("block removed")
            a2.set_ylabel("perplexity")
            t = a2.twinx()
            t.plot([b.index for b in bs], [b.angular for b in bs], "s--", c="C1", label="angular distance")
            t.set_ylabel("angular distance")
            a2.legend(fontsize=7, loc="upper right")
        _common.save_figure(fig, _common.output_path(args, "structured_gemma.png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
