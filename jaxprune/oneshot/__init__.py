"""Post-training (one-shot) pruning with calibration.

Observe, then transform: :func:`calibrate` records per-layer input statistics of any Flax model;
layer methods are values (:class:`LayerMethod`: :class:`SparseGPT`, :class:`OBS`, :class:`Wanda`,
:class:`Magnitude`, :class:`DSnoT`; :class:`GPTQ` and ``SparseGPT(quant=QuantSpec(...))``
quantize, jointly with pruning, returning dequantized weights) called as
``method(weight, stats, sparsity=None, *, pattern=..., name=...) -> (new_weight, mask)`` and
declaring the statistics they need; :func:`get_method` finds one by name. :func:`prune_layers`
and :func:`prune_sequential` prune a whole model and return ``(params, masks)``;
:func:`owl_sparsities` gives outlier-aware per-layer sparsities.

>>> import jax, jax.numpy as jnp
>>> from flax import linen as nn
>>> from jaxprune import oneshot
>>> m = nn.Dense(4); p = m.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
>>> st = oneshot.calibrate(m, p, [jax.random.normal(jax.random.key(1), (32, 8))])
>>> w, mask = oneshot.SparseGPT()(p["kernel"], st["kernel"], 0.5)
>>> float(1 - mask.mean())
0.5
>>> _, masks = oneshot.prune_layers(p, st, "sparsegpt", pattern="2:4")
>>> float(1 - masks["kernel"].mean()), masks["bias"] is None
(0.5, True)
"""

from jaxprune.oneshot.calibration import LayerStats, as_matrix, calibrate, layer_inputs
from jaxprune.oneshot.common import recon_error
from jaxprune.oneshot.dsnot import DSnoT
from jaxprune.oneshot.methods import METHODS, LayerMethod, get_method, register_method
from jaxprune.oneshot.obr import OBR
from jaxprune.oneshot.obs import OBS
from jaxprune.oneshot.owl import OWL, owl_sparsities
from jaxprune.oneshot.quant import QuantizedWeight, QuantSpec, qwix_rtn, rtn
from jaxprune.oneshot.sequential import BlockSpec, prune_layers, prune_sequential
from jaxprune.oneshot.sparsegpt import GPTQ, SparseGPT
from jaxprune.oneshot.wanda import Magnitude, PerOutput, Wanda

__all__ = [
    "LayerStats", "as_matrix", "calibrate", "layer_inputs", "recon_error",
    "METHODS", "LayerMethod", "get_method", "register_method",
    "SparseGPT", "OBS", "Wanda", "Magnitude", "DSnoT", "PerOutput",
    "OWL", "owl_sparsities", "BlockSpec", "prune_layers", "prune_sequential",
    "GPTQ", "OBR", "QuantSpec", "QuantizedWeight", "rtn", "qwix_rtn",
]
