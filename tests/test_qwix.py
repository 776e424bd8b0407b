"""qwix interop: a jaxprune-pruned Flax model through qwix's PTQ keeps its sparsity; GPTQ vs qwix RTN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxprune import oneshot
from jaxprune.core.patterns import nm_valid
from jaxprune.oneshot.common import recon_error

qwix = pytest.importorskip("qwix")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(32, name="fc2")(h)  # same shape as fc1: one compile


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(256, 32)) @ rng.normal(size=(32, 32)) * 0.3).astype(np.float32)
    model = MLP()
    params = model.init(jax.random.key(0), x[:1])["params"]
    stats = oneshot.calibrate(model, params, [jnp.asarray(x)])
    return model, params, stats, jnp.asarray(x)


def _ptq(model, params, x, qtype):
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, tile_size=16)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x[:1])["params"]
    return qmodel, qwix.quantize_params(params, abstract)


@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_pruned_model_through_qwix_ptq_keeps_sparsity(setup, qtype):
    model, params, stats, x = setup
    pruned, masks = oneshot.prune_layers(params, stats, "sparsegpt", pattern="2:4")
    qmodel, qparams = _ptq(model, pruned, x, qtype)
    for layer in ("fc1", "fc2"):
        deq = np.asarray(qwix.dequantize(qparams[layer]["kernel"].array))
        mask = np.asarray(masks[layer]["kernel"])
        assert np.all(deq[~mask] == 0), layer  # pruned weights stay exactly zero
        assert nm_valid(deq != 0, 2, 4)
        assert float(np.mean(deq == 0)) >= 0.5
    # the quantized model computes with exactly those (sparse) dequantized weights
    deq_params = jax.tree.map(lambda a: a, pruned)
    for layer in ("fc1", "fc2"):
        deq_params[layer]["kernel"] = qwix.dequantize(qparams[layer]["kernel"].array)
    y_q = qmodel.apply({"params": qparams}, x)
    np.testing.assert_allclose(y_q, model.apply({"params": deq_params}, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_error_below_qwix_rtn_on_every_layer(setup, bits):
    _, params, stats, _ = setup
    for layer in ("fc1", "fc2"):
        w, st = params[layer]["kernel"], stats[f"{layer}/kernel"]
        q, _ = oneshot.GPTQ(quant=oneshot.QuantSpec(bits, 16))(w, st)
        e_gptq = recon_error(w, q, st.hessian)
        e_qwix = recon_error(w, oneshot.qwix_rtn(w, bits, 16), st.hessian)
        assert e_gptq < e_qwix, (layer, bits, e_gptq, e_qwix)
