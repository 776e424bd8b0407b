"""Expert pruning on the trained MoE: remove 25% / 50% of experts by frequency, REAP or at random,
frequency-weighted expert merging vs pruning, and STUN (remove experts, then Wanda/SparseGPT inside
the survivors) vs pure unstructured pruning of the experts at the same parameter count.

The model is the 8-expert top-2 MoE of ``train_moe`` (:mod:`jaxprune.zoo.models.moe`, loaded from
``results/moe_params.msgpack``, trained first if absent). Expert layers come from tracing the model
(:func:`jaxprune.structured.experts.find_experts`: the router's output axis grouped with the stacked
experts' batch axis); calibration records router gates and per-expert activations on train records
(:func:`~jaxprune.structured.experts.calibrate_experts`); a model with experts removed is again an
:class:`~jaxprune.zoo.models.moe.MoE` with fewer experts per layer. Perplexity on held-out validation
records, no fine-tuning.

    python -m experiments.moe            # results/moe.{csv,json,png}
    python -m experiments.moe --quick    # smoke run -> results/moe_quick.*
    jaxprune run moe [--quick]
"""

from __future__ import annotations

import time

import numpy as np

from . import _common

CALIB_BATCHES, CALIB_BATCH = 8, 8


def _expert_params(layers: list, params: dict) -> int:
    from jaxprune.core.masks import leaves_with_paths

    flat = dict(leaves_with_paths(params))
    return int(sum(np.size(flat[p]) for lay in layers for p, _ in lay.experts))


def run(quick: bool = False, results: str | None = None) -> list[dict]:
    """All rows of the study (one per method and fraction)."""
    import jax
    import jax.numpy as jnp

    from jaxprune import oneshot
    from jaxprune.structured import experts as ex
    from jaxprune.zoo.models.moe import MoE, config_from_params, perplexity

    from . import train_moe

    cfg, params, info = train_moe.load_or_train(quick=quick, results=results)
    tr, va = train_moe.load_data(cfg.seq)
    if quick:
        va = va[:32]
    model = MoE(cfg)

    def fn(p, x):
        return model.apply({"params": p}, x)

    nb = 2 if quick else CALIB_BATCHES
    calib = [jnp.asarray(tr[i * CALIB_BATCH:(i + 1) * CALIB_BATCH, :-1], jnp.int32) for i in range(nb)]
    layers = ex.find_experts(fn, params, calib[0])
    if len(layers) != cfg.layers:
        raise RuntimeError(f"found {len(layers)} expert layers in a {cfg.layers}-layer MoE")
    gates = ex.topk_gates(cfg.top_k)
    t0 = time.time()
    stats = ex.calibrate_experts(fn, params, calib, layers, gates=gates)
    calib_s = time.time() - t0
    n_total = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    n_exp = _expert_params(layers, params)
    dense = perplexity(model, params, va)
    rows = [{"method": "dense", "experts_removed": 0.0, "inner_sparsity": 0.0, "expert_params": n_exp,
             "params": n_total, "val_ppl": dense}]

    def row(method: str, frac: float, inner: float, p: dict, sparse_frac: float = 0.0) -> None:
        c = config_from_params(cfg, p)
        ne = _expert_params(layers, p)  # slimming keeps the paths
        live = int(round(ne * (1 - sparse_frac)))
        ppl = perplexity(MoE(c), p, va)
        rows.append({"method": method, "experts_removed": frac, "inner_sparsity": inner,
                     "expert_params": live,
                     "params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(p))) - (ne - live),
                     "val_ppl": ppl})
        print(f"{method:<24} {frac:>5.2f} {inner:>6.3f} {live:>8} {ppl:>8.3f}", flush=True)

    print(f"{'method':<24} {'rm':>5} {'inner':>6} {'exp.par':>8} {'val ppl':>8}")
    print(f"{'dense':<24} {0:>5.2f} {0:>6.3f} {n_exp:>8} {dense:>8.3f}")
    rng = np.random.default_rng(0)
    scores = {c: ex.expert_scores(stats, c) for c in ("frequency", "reap")}
    scores["random"] = {k: rng.random(len(v)) for k, v in scores["frequency"].items()}
    fracs = (0.25, 0.5)
    sels = {}
    for frac in fracs:
        for crit in ("frequency", "reap", "random"):
            sel = ex.choose_experts(scores[crit], layers, frac, min_keep=cfg.top_k).keep
            sels[crit, frac] = sel
            row(f"prune:{crit}", frac, 0.0, ex.remove_experts(params, layers, sel))
        for crit in ("frequency", "reap"):
            row(f"merge:{crit}", frac, 0.0, ex.merge_experts(params, layers, sels[crit, frac], stats))
    # same expert-parameter budget (50%): STUN (25% experts + 1/3 inside) vs pure unstructured 50%
    methods = {"wanda": oneshot.Wanda(), "sparsegpt": oneshot.SparseGPT()}
    for name, meth in methods.items():
        p50, _ = ex.prune_experts(params, layers, stats, meth, 0.5)
        row(f"unstructured:{name}", 0.0, 0.5, p50, 0.5)
        slim = ex.remove_experts(params, layers, sels["reap", 0.25])
        model_s = MoE(config_from_params(cfg, slim))
        lay_s = ex.find_experts(lambda p, x: model_s.apply({"params": p}, x), slim, calib[0])
        st_s = ex.calibrate_experts(lambda p, x: model_s.apply({"params": p}, x), slim, calib, lay_s,
                                    gates=gates)
        stun, _ = ex.prune_experts(slim, lay_s, st_s, meth, 1 / 3)
        row(f"stun:reap+{name}", 0.25, 1 / 3, stun, 1 / 3)
    for r in rows:
        r["calib_tokens"] = int(stats[layers[0].name].tokens)
    print(f"calibration: {rows[0]['calib_tokens']} tokens, {calib_s:.1f} s; dense val ppl {dense:.3f} "
          f"(train_moe reported {info.get('val_ppl', float('nan')):.3f})")
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Perplexity per method at 25% / 50% of experts removed, plus the 50%-budget comparison."""
    fig, ax = _common.figure((10, 4), ncols=2)
    dense = next(r["val_ppl"] for r in rows if r["method"] == "dense")
    names = [m for m in dict.fromkeys(r["method"] for r in rows) if m.startswith(("prune", "merge"))]
    w = 0.38
    for j, frac in enumerate((0.25, 0.5)):
        ys = [next(r["val_ppl"] for r in rows if r["method"] == m and r["experts_removed"] == frac)
              for m in names]
        ax[0].bar(np.arange(len(names)) + (j - 0.5) * w, ys, w, label=f"{int(frac * 100)}% experts removed")
    ax[0].axhline(dense, color="k", ls="--", label="dense")
    ax[0].set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax[0].set_ylabel("validation perplexity")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=8)
    ax[0].set_title("pruning vs merging experts")
    budget = [r for r in rows if r["method"].startswith(("unstructured", "stun"))] + [
        r for r in rows if r["method"] == "prune:reap" and r["experts_removed"] == 0.5]
    ax[1].bar(range(len(budget)), [r["val_ppl"] for r in budget], color="tab:green")
    ax[1].axhline(dense, color="k", ls="--")
    ax[1].set_xticks(range(len(budget)), [r["method"] for r in budget], rotation=30, ha="right", fontsize=8)
    ax[1].set_yscale("log")
    ax[1].set_title("50% of expert parameters")
    _common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Run the study; write CSV, JSON and the plot."""
    ap = _common.parser("jaxprune run moe", __doc__)
    args = ap.parse_args(argv)
    rows = run(args.quick, args.results_dir)
    _common.write_csv(_common.output_path(args, "moe.csv"), rows)
    _common.write_json(_common.output_path(args, "moe.json"), rows)
    plot(rows, str(_common.output_path(args, "moe.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
