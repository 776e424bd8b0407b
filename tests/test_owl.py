"""OWL: outlier ratios, the density shift formula, group pooling, and use as an allocation."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.oneshot.owl import OWL, outlier_ratio, owl_from_ratios, owl_sparsities


def _stats(norms):
    norms = np.asarray(norms, np.float64)
    return LayerStats(None, np.zeros_like(norms), norms**2, 1, norms.size)


def test_outlier_ratio_formula():
    rng = np.random.default_rng(0)
    s = np.abs(rng.standard_cauchy(1000))
    assert outlier_ratio(s, 5.0) == pytest.approx(np.sum(s > 5.0 * s.mean()) / s.size)


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_owl_from_ratios_keeps_weighted_target_and_orders_layers(target):
    ratios, sizes, lam = [0.01, 0.05, 0.02, 0.09], [100, 400, 250, 50], 0.08
    sp = np.asarray(owl_from_ratios(ratios, sizes, target, lam))
    w = np.asarray(sizes) / np.sum(sizes)
    assert float(np.sum(w * sp)) == pytest.approx(target, abs=1e-9)
    # the paper's rule: density_l = 1 - target + 2λ·(r_l - r_min)/(r_max - r_min) - mean shift
    r = np.asarray(ratios)
    z = (r - r.min()) / (r.max() - r.min()) * 2 * lam
    np.testing.assert_allclose(sp, 1 - ((1 - target) + z - np.sum(w * z)), atol=1e-9)
    assert list(np.argsort(sp)) == list(np.argsort(-r))  # more outliers -> denser
    assert sp.max() - sp.min() == pytest.approx(2 * lam)


def test_owl_sparsities_pools_groups():
    rng = np.random.default_rng(1)
    k = {f"block_{b}/{n}": rng.normal(size=(8, 4)) for b in range(2) for n in ("q", "fc")}
    # outliers in block 1: many large entries (one huge value would only raise the mean)
    k["block_1/fc"][:3, :] = 6.0
    st = {p: _stats(np.abs(rng.normal(size=8)) + 0.5) for p in k}
    got = owl_sparsities(k, st, 0.6, M=3.0, lam=0.1, group=r"block_\d+")
    assert got["block_0/q"] == got["block_0/fc"] and got["block_1/q"] == got["block_1/fc"]
    assert got["block_1/q"] < got["block_0/q"]
    # reference: pooled |W|·‖x‖ scores per block
    pooled = {b: np.concatenate([(np.abs(k[p]) * st[p].norms[:, None]).ravel()
                                 for p in k if p.startswith(b)]) for b in ("block_0", "block_1")}
    ref = owl_from_ratios([outlier_ratio(pooled[b], 3.0) for b in pooled],
                          [v.size for v in pooled.values()], 0.6, 0.1)
    assert [got["block_0/q"], got["block_1/q"]] == pytest.approx(ref)
    with pytest.raises(ValueError, match="no kernel for calibrated layer"):
        owl_sparsities({}, st, 0.5)
    with pytest.raises(ValueError, match="owl_sparsities.*1.0"):
        owl_sparsities(k, st, 1.0)


def test_owl_allocation_through_prune_and_rejected_in_training():
    rng = np.random.default_rng(2)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}}
    params["b"]["kernel"] = params["b"]["kernel"].at[:2, :].set(5.0)  # 16 outliers
    pruned, masks = jp.prune(params, 0.5, allocation=OWL(M=3.0, lam=0.1))
    sa = 1 - float(masks["a"]["kernel"].mean())
    sb = 1 - float(masks["b"]["kernel"].mean())
    assert sb < sa and (sa + sb) / 2 == pytest.approx(0.5, abs=1 / 128)
    with pytest.raises(ValueError, match="OWL needs concrete values"):
        jp.pruner(optax.sgd(0.1), schedule=jp.OneShot(0.5, step=0), allocation=OWL())
