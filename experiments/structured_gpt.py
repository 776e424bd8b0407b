"""Toy byte-level GPT with 20% / 40% of attention heads + FFN units removed (magnitude vs Taylor vs
FLAP with/without bias compensation) and 25% of layers removed (angular distance / block influence
vs dropping the last layers): held-out perplexity, no fine-tuning.

The model is :mod:`jaxprune.structured._toy_transformer` (per-layer head / FFN counts, so a pruned
model is again an instance), trained briefly on bytes of the Python standard library's source.
Groups come from tracing the model; each head / FFN group loses the same fraction (per-group).

    python -m experiments.structured_gpt            # results/structured_gpt.{csv,json,png}
    python -m experiments.structured_gpt --quick
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench_structured import head_ffn_groups
from jaxprune.loops import cross_entropy, train_classifier
from jaxprune.structured import (
    block_scores,
    choose_blocks,
    compensate_bias,
    discover_groups,
    drop_blocks,
    group_scores,
    input_stats,
    param_count,
    select,
)
from jaxprune.structured import slim as do_slim
from jaxprune.structured._toy_transformer import ToyConfig, ToyGPT, bytes_corpus, config_from_params

RESULTS = Path(__file__).resolve().parents[1] / "results"


def windows(data: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping ``(inputs, targets)`` windows of length ``seq``."""
    n = (len(data) - 1) // seq
    x = data[: n * seq].reshape(n, seq).astype(np.int32)
    y = data[1: n * seq + 1].reshape(n, seq).astype(np.int32)
    return x, y


def perplexity(model: ToyGPT, variables: dict, x: np.ndarray, y: np.ndarray, bs: int = 64) -> float:
    """``exp`` of the mean next-byte cross-entropy."""
    f = jax.jit(lambda v, xb, yb: cross_entropy(model.apply(v, xb), yb))
    tot, n = 0.0, 0
    for i in range(0, len(x), bs):
        xb, yb = x[i:i + bs], y[i:i + bs]
        tot += float(f(variables, xb, yb)) * len(xb)
        n += len(xb)
    return math.exp(tot / n)


def main(argv: list[str] | None = None) -> int:
    """Train, prune several ways, evaluate; print a table and write results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--steps", type=int, default=None, help="default 1500 (150 with --quick)")
    a = ap.parse_args(argv)
    if a.quick:
        cfg = ToyConfig(vocab=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=16,
                        d_ff=256, max_len=64)
        steps, nbytes, seq = a.steps or 150, 120_000, 64
    else:
        cfg = ToyConfig(vocab=256, d_model=128, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=16,
                        d_ff=512, max_len=128)
        steps, nbytes, seq = a.steps or 1500, 1_200_000, 128
    data = bytes_corpus(nbytes)
    cut = int(0.9 * len(data))
    xtr, ytr = windows(data[:cut], seq)
    xte, yte = windows(data[cut:], seq)
    xte, yte = xte[:256], yte[:256]
    model = ToyGPT(cfg)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 50, steps), weight_decay=0.01)
    params, _, hist = train_classifier(model, tx, xtr, ytr, steps=steps, batch_size=32,
                                       desc="train gpt")
    v = {"params": params}
    ppl0 = perplexity(model, v, xte, yte)
    calib = [jnp.asarray(xtr[i:i + 32]) for i in range(0, 128, 32)]
    ycal = [jnp.asarray(ytr[i:i + 32]) for i in range(0, 128, 32)]

    groups = head_ffn_groups(discover_groups(model.apply, v, xtr[:1]))
    stats = input_stats(model.apply, v, calib)
    grads = None
    for xb, yb in zip(calib, ycal, strict=True):
        g = jax.grad(lambda p, xb=xb, yb=yb: cross_entropy(model.apply({"params": p}, xb), yb))(
            params)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    grads = {"params": grads}
    consumers = sorted({m.path for gr in groups for m in gr.members
                        if (m.path.endswith("o/kernel") or m.path.endswith("down/kernel"))
                        and m.axis == 0})
    means = {p: stats[p].mean for p in consumers}

    rows = [{"kind": "dense", "method": "-", "ratio": 0.0, "params": param_count(params),
             "ppl": ppl0, "notes": ""}]
    methods = [("magnitude", "l2", False), ("taylor", "taylor", False), ("flap", "flap", False),
               ("flap+bias", "flap", True)]
    from tqdm.auto import tqdm

    jobs = [(r, m) for r in a.ratios for m in methods]
    for r, (label, crit, comp) in tqdm(jobs, desc="heads+ffn"):
        sc = group_scores(v, groups, crit, grads=grads, stats=stats)
        sel = select(sc, groups, r)
        vv = compensate_bias(v, groups, sel.keep, means) if comp else v
        sv = do_slim(vv, groups, sel.keep)
        sm = ToyGPT(config_from_params(cfg, sv["params"]))
        rows.append({"kind": "heads+ffn", "method": label, "ratio": r,
                     "params": param_count(sv["params"]), "ppl": perplexity(sm, sv, xte, yte),
                     "notes": "; ".join(sel.notes[:1])})

    bs = block_scores(model.apply, v, calib)
    n_drop = max(1, int(round(0.25 * cfg.n_layers)))
    for metric in ("angular", "influence", "last"):
        rm = choose_blocks(bs, n_drop, metric)
        sv = drop_blocks(v, rm)
        sm = ToyGPT(config_from_params(cfg, sv["params"]))
        rows.append({"kind": "layers", "method": metric, "ratio": n_drop / cfg.n_layers,
                     "params": param_count(sv["params"]), "ppl": perplexity(sm, sv, xte, yte),
                     "notes": f"removed blocks {rm}"})

    print(f"dense: {cfg.n_layers} layers, d={cfg.d_model}, {steps} steps, "
          f"final train loss {hist['loss'][-1]:.3f}")
    print("block scores: " + ", ".join(f"{s.index}: ang {s.angular:.3f} / inf {s.influence:.3f}"
                                       for s in bs))
    print(f"{'kind':<10} {'method':<10} {'ratio':>5} {'params':>8} {'ppl':>8}  notes")
    for row in rows:
        print(f"{row['kind']:<10} {row['method']:<10} {row['ratio']:>5.2f} {row['params']:>8d} "
              f"{row['ppl']:>8.3f}  {row['notes']}")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "structured_gpt.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "steps": steps,
            "train_bytes": cut, "test_windows": int(len(xte)), "seq": seq, "quick": a.quick,
            "block_scores": [s._asdict() for s in bs]}
    (RESULTS / "structured_gpt.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                            indent=2, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, _, _ in methods:
            rs = [row for row in rows if row["method"] == label]
            ax.plot([0.0] + [row["ratio"] for row in rs], [ppl0] + [row["ppl"] for row in rs],
                    "o-", label=label)
        ax.set_xlabel("fraction of heads + FFN units removed")
        ax.set_ylabel("held-out perplexity (bytes)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "structured_gpt.png", dpi=100)
    except Exception as e:  # noqa: BLE001 - plotting is optional
        print(f"(plot skipped: {e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
