"""Train a small byte-level GPT on the Python standard library's source; report held-out perplexity.

Data: the ``stdlib_bytes`` tfds dataset (array_record, read with tfds' data source, no tensorflow;
see ``jaxprune.zoo.data.text_tfds``). The trained params go to ``results/gpt_params.msgpack`` (with
``results/gpt_config.json``) so ``oneshot_gpt`` can reuse them; it retrains when they are absent.

    jaxprune run train_gpt            # ~4 layers, d=128, a few CPU minutes
    jaxprune run train_gpt --quick    # a smoke run
"""

from __future__ import annotations

import os

import numpy as np

from jaxprune.zoo.data import text_tfds
from jaxprune.zoo.models.gpt import GPT, GPTConfig, loss_fn, perplexity

from . import _common

VAL_RECORDS = 512  # fixed held-out subset (first records of the validation split)
QUICK = (40, 8)  # (steps, batch) of a --quick smoke run


def load_data(data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` byte records from the tfds dataset."""
    return text_tfds.load_split("train", data_dir), text_tfds.load_split("validation", data_dir)


def train(cfg: GPTConfig, steps: int, batch: int, lr: float, seed: int = 0,
          data_dir: str | None = None, progress: bool = True) -> tuple[dict, dict]:
    """Train; returns ``(params, info)`` with validation perplexity."""
    tr, va = load_data(data_dir)
    tr, va = tr[:, : cfg.seq + 1], va[:VAL_RECORDS, : cfg.seq + 1]
    model = GPT(cfg)
    params, run = _common.train_lm(model, lambda p, r: loss_fn(model, p, r), tr, steps=steps,
                                   batch=batch, lr=lr, seed=seed, desc="train gpt",
                                   progress=progress)
    ppl = perplexity(model, params, va)
    info = {"steps": steps, "batch": batch, "lr": lr, **run, "val_ppl": ppl,
            "val_bits_per_byte": float(np.log2(ppl)),
            "train_records": int(len(tr)), "val_records": int(len(va)), "config": cfg._asdict()}
    return params, info


def load_or_train(quick: bool = False, retrain: bool = False,
                  results: str | os.PathLike | None = None) -> tuple[GPTConfig, dict, dict]:
    """The trained GPT from the results directory (training and saving it first if absent)."""
    cfg = GPTConfig(seq=128)
    steps, batch = QUICK if quick else (300, 16)
    return _common.load_or_train_lm("gpt", GPT, cfg, lambda: train(cfg, steps, batch, 3e-3),
                                    save=not quick, retrain=retrain, results=results)


def main(argv: list[str] | None = None) -> int:
    """Train the GPT and print its held-out perplexity."""
    ap = _common.parser("jaxprune run train_gpt", __doc__, steps=300, lr=3e-3)
    ap.add_argument("--batch", type=_common.positive_int, default=16)
    ap.add_argument("--seq", type=_common.positive_int, default=128)
    ap.add_argument("--pos", choices=["learned", "rope"], default="learned")
    args = ap.parse_args(argv)
    cfg = GPTConfig(pos=args.pos, seq=args.seq)
    steps, batch = QUICK if args.quick else (args.steps, args.batch)
    params, info = train(cfg, steps, batch, args.lr)
    print(_common.finish_lm_training(args, "gpt", params, cfg, info, ("bpb", ">6.3f", "val_bits_per_byte")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
