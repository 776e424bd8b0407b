"""Digits CNN with 25% / 50% of conv channels removed: accuracy before/after a short fine-tune,
parameter count and measured CPU inference time (slim vs original, median of several runs).

Channel groups are discovered by tracing the model (conv out channel → next conv's input channel /
the flattened dense rows); channels are ranked by the L2 norm of the whole group.

    python -m experiments.structured_cnn            # results/structured_cnn.{csv,json,png}
    python -m experiments.structured_cnn --quick
"""

from __future__ import annotations

import jax
import optax

from jaxprune.structured import choose_units, discover_groups, group_scores, param_count
from jaxprune.structured import slim as do_slim
from jaxprune.zoo.data import load_digits
from jaxprune.zoo.loops import accuracy, train_classifier
from jaxprune.zoo.models import CNN, rebuild_small

from . import _common
from .bench_structured import median_time


def main(argv: list[str] | None = None) -> int:
    """Train, prune, fine-tune, time; print a table and write results."""
    ap = _common.parser("jaxprune run structured_cnn", __doc__, steps=1500)
    ap.add_argument("--ratios", type=_common.unit_fraction, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--finetune", type=_common.positive_int, default=200)
    ap.add_argument("--criterion", default="l2")
    a = ap.parse_args(argv)
    steps, ft = (300, 50) if a.quick else (a.steps, a.finetune)
    iters, repeats = (5, 3) if a.quick else (20, 7)
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    model = CNN()
    params, _, _ = train_classifier(model, optax.adam(1e-3), xtr, ytr, steps=steps, desc="train")
    v = {"params": params}
    acc0 = accuracy(model.apply, params, xte, yte)
    groups = [g for g in discover_groups(model.apply, v, xtr[:1])
              if g.members[0].path.startswith("params/Conv")]
    xb = jax.numpy.asarray(xte)
    f0 = jax.jit(model.apply)
    t0 = median_time(lambda: f0(v, xb), iters, repeats)
    rows = [{"ratio": 0.0, "channels": "32/64", "params": param_count(params), "acc_pruned": acc0,
             "acc_finetuned": acc0, "ms": t0 * 1e3, "speedup": 1.0}]
    from tqdm.auto import tqdm

    for r in tqdm(a.ratios, desc="ratios"):
        sel = choose_units(group_scores(v, groups, a.criterion), groups, r)
        sv = do_slim(v, groups, sel.keep)
        sm = rebuild_small(model, sv["params"])
        acc1 = accuracy(sm.apply, sv["params"], xte, yte)
        p2, _, _ = train_classifier(sm, optax.adam(3e-4), xtr, ytr, steps=ft, params=sv["params"],
                                    desc=f"finetune {r}")
        acc2 = accuracy(sm.apply, p2, xte, yte)
        f1 = jax.jit(sm.apply)
        t1 = median_time(lambda f1=f1, p2=p2: f1({"params": p2}, xb), iters, repeats)
        rows.append({"ratio": r, "channels": "/".join(map(str, sm.channels)),
                     "params": param_count(p2), "acc_pruned": acc1, "acc_finetuned": acc2,
                     "ms": t1 * 1e3, "speedup": t0 / t1})
    print(_common.format_table(
        [("removed", ">7.2f"), ("channels", ">9"), ("params", ">8d"), ("acc pruned", ">10.4f"),
         ("acc ft", ">7.4f"), ("ms/batch", ">8.3f"), ("speedup", ">7.2f")],
        [(row["ratio"], row["channels"], row["params"], row["acc_pruned"], row["acc_finetuned"],
          row["ms"], row["speedup"]) for row in rows]))
    _common.write_csv(_common.output_path(a, "structured_cnn.csv"), rows)
    meta = {"train_steps": steps, "finetune_steps": ft, "criterion": a.criterion,
            "test_images": int(len(xte)), "timing": f"median of {repeats} x {iters} calls",
            "device": str(jax.devices()[0]), "quick": a.quick}
    _common.write_json(_common.output_path(a, "structured_cnn.json"), {"meta": meta, "rows": rows})
    with _common.optional_plot("structured_cnn.png"):
        fig, ax = _common.figure((8, 3), ncols=2)
        rs = [row["ratio"] for row in rows]
        ax[0].plot(rs, [row["acc_pruned"] for row in rows], "o-", label="pruned")
        ax[0].plot(rs, [row["acc_finetuned"] for row in rows], "s-", label="fine-tuned")
        ax[0].set_xlabel("fraction of channels removed")
        ax[0].set_ylabel("test accuracy")
        ax[0].legend()
        ax[1].bar([str(x) for x in rs], [row["ms"] for row in rows])
        ax[1].set_ylabel("ms / test-set forward (CPU)")
        _common.save_figure(fig, _common.output_path(a, "structured_cnn.png"), dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
