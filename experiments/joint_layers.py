"""Joint 2:4 + int-b sweep vs "prune, then quantize" on single layers, by layer size and group size.

For each layer shape and quantization group size, random layers (``--layers`` per cell) with
correlated inputs (``x = z A / 2 + b``, ``z`` and ``A`` standard normal: the kind of feature
correlation that makes compensation matter) are compressed three ways, all with SparseGPT's 2:4
mask selection:

* ``sparsegpt``: 2:4 only, float32 values (the floor the other two add quantization error to);
* ``prune_then_rtn``: SparseGPT 2:4, then round-to-nearest of the kept weights
  (:class:`~jaxprune.oneshot.quant.RoundToNearest`);
* ``joint``: one sweep that chooses the mask, puts the kept weights on the grid and compensates
  both errors (``SparseGPT(quant=QuantSpec(bits, group))``).

Error: the relative reconstruction error ``‖(W − Ŵ)X‖² / ‖WX‖²`` from the layer's Hessian. The
table reports, per cell, the mean of each error and on how many layers the joint sweep is below
prune-then-RTN. Writes JSON.

    jaxprune run joint_layers [--bits 4] [--layers 6] [--quick]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _common

SHAPES = ((32, 6, 96), (128, 48, 512), (256, 64, 512))  # (fan_in, out, tokens)
GROUPS = (16, 32, 128)


def random_layer(fan_in: int, out: int, tokens: int, seed: int) -> tuple[np.ndarray, Any]:
    """A ``(fan_in, out)`` float32 weight and the :class:`LayerStats` of correlated inputs.

    >>> w, st = random_layer(8, 2, 16, 0)
    >>> w.shape, st.hessian.shape
    ((8, 2), (8, 8))
    """
    from jaxprune.oneshot.calibration import LayerStats

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, fan_in)) @ rng.normal(size=(fan_in, fan_in)) * 0.5
    x = x + rng.normal(size=fan_in)
    w = rng.normal(size=(fan_in, out)).astype(np.float32)
    return w, LayerStats.from_inputs(x.astype(np.float32))


def cell(fan_in: int, out: int, tokens: int, group: int, bits: int, seeds: int) -> dict[str, Any]:
    """Errors of the three compressions on ``seeds`` random layers of one shape and group size."""
    from jaxprune.oneshot.common import recon_error
    from jaxprune.oneshot.quant import QuantSpec, RoundToNearest
    from jaxprune.oneshot.sparsegpt import SparseGPT

    spec = QuantSpec(bits, group)
    errs: dict[str, list[float]] = {"sparsegpt": [], "prune_then_rtn": [], "joint": []}
    for seed in range(seeds):
        w, st = random_layer(fan_in, out, tokens, 20 + seed)
        for name, method in (("sparsegpt", SparseGPT()),
                             ("prune_then_rtn", RoundToNearest(SparseGPT(), spec)),
                             ("joint", SparseGPT(quant=spec))):
            wq, _ = method(w, st, pattern="2:4")
            errs[name].append(recon_error(w, wq, st.hessian))
    joint, sep = np.array(errs["joint"]), np.array(errs["prune_then_rtn"])
    return {"fan_in": fan_in, "out": out, "tokens": tokens, "group": group, "bits": bits,
            "errors": errs, "joint_wins": int((joint < sep).sum()), "layers": seeds,
            **{f"mean_{k}": float(np.mean(v)) for k, v in errs.items()}}


def main(argv: list[str] | None = None) -> int:
    """Run the grid, print the table, write ``results/joint_layers.json``."""
    ap = _common.parser("jaxprune run joint_layers", __doc__)
    ap.add_argument("--bits", type=int, default=4, choices=range(2, 9), metavar="{2..8}")
    ap.add_argument("--layers", type=_common.positive_int, default=6,
                    help="random layers per cell (default 6)")
    args = ap.parse_args(argv)
    shapes, groups, n = (SHAPES[:1], GROUPS[:1], 2) if args.quick else (SHAPES, GROUPS, args.layers)
    rows = [cell(f, o, t, g, args.bits, n) for f, o, t in shapes for g in groups if g <= f]
    print(_common.format_table(
        [("layer (fan_in x out, tokens)", "30s"), ("group", ">5d"), ("2:4 only", ">9.4f"),
         ("prune→RTN", ">10.4f"), ("joint", ">8.4f"), ("joint wins", ">10s")],
        [(f"{r['fan_in']}x{r['out']}, {r['tokens']}", r["group"], r["mean_sparsegpt"],
          r["mean_prune_then_rtn"], r["mean_joint"], f"{r['joint_wins']}/{r['layers']}")
         for r in rows]))
    out = _common.write_json(_common.output_path(args, "joint_layers.json"),
                             {"bits": args.bits, "pattern": "2:4", "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
