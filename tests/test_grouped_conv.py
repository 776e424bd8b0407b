"""Grouped and depthwise convs in one-shot pruning: per-group calibration statistics (against a
numpy im2col oracle) and every group pruned as a layer of its own (against the method run on that
group alone)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxprune import oneshot
from jaxprune.core.masks import leaves_with_paths
from jaxprune.oneshot.calibration import LayerStats, calibrate, layer_inputs


class GroupedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), padding="SAME", name="stem")(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8, padding="SAME", name="dw")(nn.relu(x))
        x = nn.Conv(8, (3, 3), feature_group_count=2, padding="SAME", name="g2")(x)
        return nn.Dense(4, name="head")(x.mean((1, 2)))


def _patches(x, kh, kw, groups):
    """(groups, positions, kh*kw*cg) SAME-padded patches, in the kernel's (*window, in) order."""
    n, h, w, c = x.shape
    cg = c // groups
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    rows = np.stack([xp[:, i:i + kh, j:j + kw, :] for i in range(h) for j in range(w)], 1)
    rows = rows.reshape(-1, kh, kw, groups, cg)
    return np.stack([rows[..., g, :].reshape(rows.shape[0], -1) for g in range(groups)])


@pytest.fixture(scope="module")
def net():
    m = GroupedNet()
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    p = m.init(jax.random.key(1), x)["params"]
    return m, p, [x, 0.5 * x + 1.0]


def test_grouped_conv_stats_match_per_group_patches(net):
    m, p, xs = net
    st = calibrate(m, p, xs)
    for name, groups in (("dw", 8), ("g2", 2)):
        s = st[f"{name}/kernel"]
        assert s.groups == groups and s.fan_in == 9 * 8 // groups
        assert s.gram.shape == (groups, s.fan_in, s.fan_in)
        src = "stem" if name == "dw" else "dw"  # dw reads relu(stem), g2 reads dw
        h = [np.asarray(m.apply({"params": p}, x, capture_intermediates=True)[1]["intermediates"]
                        [src]["__call__"][0]) for x in xs]
        h = [np.maximum(a, 0) if name == "dw" else a for a in h]
        rows = np.concatenate([_patches(a, 3, 3, groups) for a in h], axis=1)
        for g in range(groups):
            ref = LayerStats.from_inputs(rows[g])
            np.testing.assert_allclose(s.group(g).gram, ref.gram, rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(s.group(g).norms, ref.norms, rtol=1e-4, atol=1e-4)
        assert s.count == rows.shape[1]
    got = layer_inputs(m, p, xs[0])["g2/kernel"]
    assert got.shape == (2, 4 * 36, 36)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "obs", "wanda+dsnot", "sparsegpt+int8"])
def test_each_group_pruned_as_its_own_layer(net, method):
    m, p, xs = net
    st = calibrate(m, p, xs)
    q, masks = oneshot.prune_layers(p, st, method, 0.5)
    meth = oneshot.get_method(method)
    s = st["g2/kernel"]
    w2 = np.asarray(p["g2"]["kernel"]).reshape(s.fan_in, 8)
    got_q = np.asarray(q["g2"]["kernel"]).reshape(s.fan_in, 8)
    got_m = np.asarray(masks["g2"]["kernel"]).reshape(s.fan_in, 8)
    for g in range(2):
        rq, rm = meth(w2[:, 4 * g:4 * g + 4], s.group(g), 0.5)
        np.testing.assert_array_equal(got_m[:, 4 * g:4 * g + 4], np.asarray(rm))
        np.testing.assert_allclose(got_q[:, 4 * g:4 * g + 4], np.asarray(rq), rtol=1e-5, atol=1e-6)
    # the depthwise layer's 72 weights (8 groups of 9): exactly 36 pruned, 4 or 5 per group
    dwm = np.asarray(masks["dw"]["kernel"]).reshape(9, 8)
    assert (~dwm).sum() == 36 and sorted(set((~dwm).sum(0).tolist())) == [4, 5]
    for path, mk in leaves_with_paths(masks):
        if mk is not None:  # exactly sparse everywhere
            assert not np.asarray(dict(leaves_with_paths(q))[path])[~np.asarray(mk)].any()
    # the Hessian methods reconstruct better than magnitude on the grouped layers' outputs
    if method == "sparsegpt":
        qm, _ = oneshot.prune_layers(p, st, "magnitude", 0.5)
        y = m.apply({"params": p}, xs[0])
        err = lambda t: float(jnp.linalg.norm(m.apply({"params": t}, xs[0]) - y))  # noqa: E731
        assert err(q) < err(qm)


def test_grouped_conv_owl_and_refusals(net):
    m, p, xs = net
    st = calibrate(m, p, xs, gram=False)
    sp = oneshot.owl_sparsities({k: dict(leaves_with_paths(p))[k] for k in st}, st, 0.5)
    assert set(sp) == set(st) and all(0.0 <= v < 1.0 for v in sp.values())
    with pytest.raises(ValueError, match="needs calibration with gram=True"):
        oneshot.prune_layers(p, st, "sparsegpt", 0.5)
    with pytest.raises(ValueError, match="not divisible by m=4"):  # 3x3 depthwise: fan-in 9
        oneshot.prune_layers(p, st, "wanda", pattern="2:4")


def test_pack_params_refuses_grouped_conv_at_pack_time(net):
    """Packed kernels run ungrouped convs only: refused when packing (it used to pack, then fail
    inside apply_packed), and the rest of the model packs with the grouped conv left dense."""
    import jaxprune as jp
    from jaxprune import kernels

    m, p, xs = net
    fn = lambda q, x: m.apply({"params": q}, x)  # noqa: E731
    om = jp.operator_map(fn, p, xs[0])
    q, masks = jp.prune(p, 0.5, opmap=om)
    with pytest.raises(ValueError, match="'dw/kernel' is a grouped conv"):
        kernels.pack_params(q, masks, om, pattern="unstructured")
    q, masks = jp.prune(p, 0.5, opmap=om, filter=jp.filters.PathRegex("(stem|head)/kernel"))
    packed = kernels.pack_params(q, masks, om, pattern="unstructured")
    np.testing.assert_allclose(kernels.apply_packed(fn, packed, xs[0]), fn(q, xs[0]),
                               rtol=1e-5, atol=1e-5)
