"""Train the small MoE byte decoder (8 experts, top-2, load-balancing loss) on the offline corpus.

Data: the ``stdlib_bytes`` tfds dataset, as in ``train_gpt``. The trained params go to
``results/moe_params.msgpack`` (with ``results/moe_config.json``) so ``jaxprune run moe`` reuses them;
it retrains when they are absent.

    jaxprune run train_moe            # d=64, 2 layers, 8 experts; a few CPU minutes
    jaxprune run train_moe --quick    # a smoke run (saves nothing)
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.zoo.models.moe import MoE, MoEConfig, loss_fn, perplexity

from . import _common

VAL_RECORDS = 256  # fixed held-out subset (first records of the validation split)
QUICK = (30, 8)  # (steps, batch) of a --quick smoke run


def load_data(seq: int, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` byte records of length ``seq + 1``."""
    from jaxprune.zoo.data import text_tfds

    tr = text_tfds.load_split("train", data_dir)[:, : seq + 1]
    va = text_tfds.load_split("validation", data_dir)[:VAL_RECORDS, : seq + 1]
    return tr, va


def expert_load(model: MoE, params: dict, records: np.ndarray) -> list[list[float]]:
    """Fraction of routed tokens per expert, per layer (how balanced the trained router is)."""
    from jaxprune.zoo.models.moe import route

    _, st = model.apply({"params": params}, jnp.asarray(records[:, :-1], jnp.int32),
                        capture_intermediates=lambda mdl, _: mdl.name == "ln2", mutable=["intermediates"])
    out = []
    for i in range(model.cfg.layers):
        h = st["intermediates"][f"block_{i}"]["ln2"]["__call__"][0]
        g, _ = route(h @ params[f"block_{i}"]["moe"]["router"], model.cfg.top_k)
        c = np.asarray((g > 0).sum(axis=(0, 1)), np.float64)
        out.append((c / c.sum()).round(4).tolist())
    return out


def train(cfg: MoEConfig, steps: int, batch: int, lr: float, aux_weight: float = 0.01, seed: int = 0,
          progress: bool = True) -> tuple[dict, dict]:
    """Train; returns ``(params, info)`` with validation perplexity and the expert load."""
    tr, va = load_data(cfg.seq)
    model = MoE(cfg)
    params, run = _common.train_lm(model, lambda p, r: loss_fn(model, p, r, aux_weight), tr,
                                   steps=steps, batch=batch, lr=lr, seed=seed, desc="train moe",
                                   progress=progress)
    ppl = perplexity(model, params, va)
    n_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    info = {"steps": steps, "batch": batch, "lr": lr, "aux_weight": aux_weight,
            **run, "val_ppl": ppl,
            "val_records": int(len(va)), "params": n_params,
            "expert_load": expert_load(model, params, va[:64]), "config": cfg._asdict()}
    return params, info


def load_or_train(quick: bool = False, results: str | os.PathLike | None = None
                  ) -> tuple[MoEConfig, dict, dict]:
    """The trained MoE from the results directory (trained and saved first when absent)."""
    cfg = MoEConfig()
    steps, batch = QUICK if quick else (400, 16)
    return _common.load_or_train_lm("moe", MoE, cfg, lambda: train(cfg, steps, batch, 3e-3),
                                    save=not quick, results=results)


def main(argv: list[str] | None = None) -> int:
    """Train the MoE and print its held-out perplexity."""
    ap = _common.parser("jaxprune run train_moe", __doc__, steps=400, lr=3e-3)
    ap.add_argument("--batch", type=_common.positive_int, default=16)
    ap.add_argument("--aux-weight", type=float, default=0.01)
    args = ap.parse_args(argv)
    cfg = MoEConfig()
    steps, batch = QUICK if args.quick else (args.steps, args.batch)
    params, info = train(cfg, steps, batch, args.lr, args.aux_weight)
    print(_common.finish_lm_training(args, "moe", params, cfg, info, ("params", ">8", "params")))
    print("expert load per layer:", info["expert_load"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
