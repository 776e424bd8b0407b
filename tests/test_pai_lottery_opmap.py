"""Pruning at init (SNIP, GraSP, SynFlow) and IMP take ``opmap=``: an N:M pattern acts on the
matrix view traced from the model (a PyTorch-layout ``(out, in)`` weight used as ``x @ w.T`` is
grouped along its real fan-in, axis 1), as in every other family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.training import lottery, pai


def _model():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"fc1": {"weight": jax.random.normal(k1, (16, 8))},     # (out, in), PyTorch layout
              "fc2": {"weight": jax.random.normal(k2, (4, 16))}}

    def apply(p, x):
        return jnp.tanh(x @ p["fc1"]["weight"].T) @ p["fc2"]["weight"].T

    x = jax.random.normal(jax.random.key(1), (6, 8))
    y = jax.random.normal(jax.random.key(2), (6, 4))
    return params, apply, x, y


def _nm_along_axis1(m: np.ndarray, n: int = 2, mm: int = 4) -> bool:
    g = np.asarray(m).reshape(m.shape[0], m.shape[1] // mm, mm)
    return bool((g.sum(-1) == n).all())


def _check(masks):
    for name in ("fc1", "fc2"):
        m = np.asarray(masks[name]["weight"])
        assert _nm_along_axis1(m), name                     # 2 kept in every 4 inputs of a row
        assert m.mean() == 0.5


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_pai_nm_follows_the_traced_fan_in(method):
    params, apply, x, y = _model()
    om = jp.operator_map(apply, params, x)
    loss = lambda p, b: jnp.mean((apply(p, b[0]) - b[1]) ** 2)  # noqa: E731
    if method == "synflow":
        pruned, masks = pai.synflow(apply, params, (1, 8), pattern="2:4", rounds=3, opmap=om)
    else:
        pruned, masks = getattr(pai, method)(loss, params, (x, y), pattern="2:4", opmap=om)
    _check(masks)
    for name in ("fc1", "fc2"):
        w, m = np.asarray(pruned[name]["weight"]), np.asarray(masks[name]["weight"])
        assert (w[~m] == 0).all() and (w[m] == np.asarray(params[name]["weight"])[m]).all()


def test_pai_without_opmap_does_not_select_pytorch_names():
    params, apply, x, y = _model()
    loss = lambda p, b: jnp.mean((apply(p, b[0]) - b[1]) ** 2)  # noqa: E731
    with pytest.warns(UserWarning, match="selected no leaf"):
        pai.snip(loss, params, (x, y), 0.5)


def test_imp_nm_follows_the_traced_fan_in():
    params, apply, x, _ = _model()
    om = jp.operator_map(apply, params, x)
    res = lottery.imp(params, lambda p, m: jax.tree.map(lambda a: a * 1.5, p), pattern="2:4",
                      rounds=2, opmap=om)
    _check(res.rounds[-1].masks)
    # the oracle: per row and group of 4 inputs, the 2 largest |w| of the trained weights
    for name in ("fc1", "fc2"):
        w = np.abs(np.asarray(params[name]["weight"])).reshape(-1, 4)
        want = np.zeros_like(w, bool)
        np.put_along_axis(want, np.argsort(-w, axis=1, kind="stable")[:, :2], True, axis=1)
        got = np.asarray(res.rounds[-1].masks[name]["weight"]).reshape(-1, 4)
        assert (got == want).all(), name


def test_imp_masks_opmap_keeps_pruned_entries():
    params, apply, x, _ = _model()
    om = jp.operator_map(apply, params, x)
    old = jax.tree.map(lambda w: jnp.ones(w.shape, bool).at[0, 0].set(False), params)
    new = lottery.imp_masks(params, old, None, pattern="2:4", opmap=om)
    _check(new)
    assert not bool(new["fc1"]["weight"][0, 0]) and not bool(new["fc2"]["weight"][0, 0])


def test_pai_refuses_an_opmap_of_another_tree():
    params, apply, x, y = _model()
    om = jp.operator_map(lambda p, x: apply(p["params"], x), {"params": params}, x)
    loss = lambda p, b: jnp.mean((apply(p, b[0]) - b[1]) ** 2)  # noqa: E731
    with pytest.raises(ValueError, match="operator map"):
        pai.snip(loss, params, (x, y), pattern="2:4", opmap=om, filter=lambda p, a: a.ndim == 2)


@pytest.mark.parametrize("allocation", ["uniform", "global", "erk"])
def test_nm_pattern_is_exact_in_every_leaf_whatever_the_allocation(allocation):
    # an allocation's per-leaf share used to reach the N:M pattern: ERK/global gave the small
    # leaf 3:4 and a total sparsity of 0.42 for "2:4"
    p = {"a": {"kernel": jax.random.normal(jax.random.key(0), (8, 16))},
         "b": {"kernel": 5 * jax.random.normal(jax.random.key(1), (16, 4))}}
    pruned, masks = jp.prune(p, None, pattern="2:4", allocation=allocation)
    for k in p:
        m = np.asarray(masks[k]["kernel"])                      # groups along axis 0 (fan-in)
        assert (m.T.reshape(m.shape[1], -1, 4).sum(-1) == 2).all(), k
    assert float(jp.total_sparsity(pruned, masks)) == 0.5


def test_nm_ramp_with_erk_ends_exactly_nm():
    import optax

    p = {"a": {"kernel": jax.random.normal(jax.random.key(0), (8, 16))},
         "b": {"kernel": jax.random.normal(jax.random.key(1), (16, 4))}}
    tx = jp.pruner(optax.sgd(0.0), schedule=jp.Polynomial(0.5, begin=0, end=4, freq=2),
                   allocation="erk", pattern="2:4")
    st = tx.init(p)
    for _ in range(6):
        u, st = tx.update(jax.tree.map(jnp.zeros_like, p), st, p)
        p = optax.apply_updates(p, u)
    for k, m in jp.get_masks(st).items():
        m = np.asarray(m["kernel"])
        assert (m.T.reshape(m.shape[1], -1, 4).sum(-1) == 2).all(), k


def test_synflow_wrong_input_shape_is_named():
    params, apply, x, _ = _model()
    om = jp.operator_map(apply, params, x)
    with pytest.raises(ValueError, match=r"input_shape.*batch dimension"):
        pai.synflow(apply, params, (1, 9), pattern="2:4", opmap=om)


def test_synflow_on_equal_weights_keeps_the_exact_count():
    # a global threshold over tied scores kept nothing (0.5 of a constant init pruned everything)
    p = {"kernel": jnp.ones((4, 2))}
    _, m = pai.synflow(lambda p, x: x @ p["kernel"], p, (1, 4), 0.5, rounds=2)
    assert int(m["kernel"].sum()) == 4


def test_rigl_drop_fraction_as_numpy_or_jax_scalar():
    import optax

    from jaxprune.training.dst import rigl

    params, *_ = _model()
    flt = {"filter": lambda path, a: a.ndim == 2}
    ref = jp.get_masks(rigl(optax.sgd(0.1), 0.5, total_steps=10, drop_fraction=0.25, **flt)
                       .init(params))
    for v in (np.float32(0.25), jnp.float32(0.25)):
        got = jp.get_masks(rigl(optax.sgd(0.1), 0.5, total_steps=10, drop_fraction=v, **flt)
                           .init(params))
        pairs = zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
        assert all(bool((a == b).all()) for a, b in pairs)
    for bad in (1.0, float("nan"), True, jnp.array([0.3])):
        with pytest.raises(ValueError, match=r"drop_fraction must be in \(0, 1\)"):
            rigl(optax.sgd(0.1), 0.5, total_steps=10, drop_fraction=bad, **flt)
