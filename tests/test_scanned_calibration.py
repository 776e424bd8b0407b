"""One-shot pruning of layers stacked for ``nn.scan``: calibration unrolls the scan and records
per-layer statistics, and every method prunes each stacked layer as a layer of its own — checked
against the same model written with separate (unrolled) layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxprune import oneshot
from jaxprune.oneshot.calibration import calibrate

D, L = 8, 3


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        w = self.param("w", nn.initializers.lecun_normal(), (D, 2 * D))
        v = self.param("v", nn.initializers.lecun_normal(), (2 * D, D))
        return h + jnp.tanh(h @ w) @ v, None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="inp")(x)
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=L)(name="layers")(h, None)
        return h


def unrolled(p, x):
    """The same model with one leaf per layer."""
    h = x @ p["inp"]["kernel"] + p["inp"]["bias"]
    for i in range(L):
        h = h + jnp.tanh(h @ p[f"w{i}"]) @ p[f"v{i}"]
    return h


@pytest.fixture(scope="module")
def models():
    m = Scanned()
    x = jax.random.normal(jax.random.key(0), (16, 8))
    p = m.init(jax.random.key(1), x)["params"]
    flat = {"inp": p["inp"], **{f"w{i}": p["layers"]["w"][i] for i in range(L)},
            **{f"v{i}": p["layers"]["v"][i] for i in range(L)}}
    np.testing.assert_allclose(m.apply({"params": p}, x), unrolled(flat, x), rtol=1e-5, atol=1e-5)
    return m, p, flat, [x, 2 * x + 1]


def test_scanned_stats_are_the_unrolled_layers_stats(models):
    m, p, flat, xs = models
    st = calibrate(m, p, xs)
    ref = calibrate(unrolled, flat, xs)
    for name in ("w", "v"):
        s = st[f"layers/{name}"]
        assert s.entries == L and s.gram.shape == (L, s.fan_in, s.fan_in)
        for i in range(L):
            r = ref[f"{name}{i}"]
            np.testing.assert_allclose(s.entry(i).gram, r.gram, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(s.entry(i).sum, r.sum, rtol=1e-5, atol=1e-4)
            assert s.entry(i).count == r.count


@pytest.mark.parametrize("method,kw", [("sparsegpt", {"sparsity": 0.5}),
                                       ("wanda", {"pattern": "2:4"}), ("obs", {"sparsity": 0.5}),
                                       ("magnitude", {"sparsity": 0.5})])
def test_each_stacked_layer_pruned_as_its_own_layer(models, method, kw):
    m, p, flat, xs = models
    q, masks = oneshot.prune_layers(p, calibrate(m, p, xs), method, **kw)
    rq, rmasks = oneshot.prune_layers(flat, calibrate(unrolled, flat, xs), method, **kw)
    for name in ("w", "v"):
        for i in range(L):
            np.testing.assert_array_equal(masks["layers"][name][i], rmasks[f"{name}{i}"])
            np.testing.assert_allclose(q["layers"][name][i], rq[f"{name}{i}"], rtol=1e-4,
                                       atol=1e-5)
            assert float(1 - masks["layers"][name][i].mean()) == pytest.approx(0.5)


def test_scanned_refusals(models):
    m, p, _, xs = models
    st = calibrate(m, p, xs)
    with pytest.raises(ValueError, match="layers/[wv].*stacked for a scan"):
        oneshot.prune_layers(p, st, "gptq", return_codes=True)


def test_weight_shared_by_every_iteration_sums_its_uses():
    """A weight the scan does not slice (a scan const) is one layer applied L times: its
    statistics are the sum over the iterations, as in the unrolled model."""
    def scanned(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ p["shared"]) @ w, None), x, p["stack"])[0]

    def unrolled_shared(p, x):
        for i in range(L):
            x = jnp.tanh(x @ p["shared"]) @ p["stack"][i]
        return x

    p = {"shared": jax.random.normal(jax.random.key(2), (D, D)),
         "stack": jax.random.normal(jax.random.key(3), (L, D, D)) / 3}
    x = jax.random.normal(jax.random.key(4), (6, D))
    st, ref = calibrate(scanned, p, [x]), calibrate(unrolled_shared, p, [x])
    assert st["shared"].entries == 1 and st["stack"].entries == L
    np.testing.assert_allclose(st["shared"].gram, ref["shared"].gram, rtol=1e-5, atol=1e-4)
    assert st["shared"].count == ref["shared"].count == L * 6


def test_nested_scan_refused():
    def fn(p, x):
        def outer(h, ws):
            return jax.lax.scan(lambda g, w: (jnp.tanh(g @ w), None), h, ws)[0], None
        return jax.lax.scan(outer, x, p["w"])[0]

    p = {"w": jax.random.normal(jax.random.key(5), (2, 2, D, D))}
    with pytest.raises(ValueError, match="'w'.*nested scans"):
        calibrate(fn, p, [jnp.ones((3, D))])
