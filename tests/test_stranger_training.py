"""Training-time pruning driven like a newcomer would: own models, own optax setups, bad arguments.

Each test compares against an oracle (exact zeros off the mask, exact counts, hand-computed
masks) or checks that a mistake is refused with an error naming it.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune.training import lottery as lt
from jaxprune.training import pai
from jaxprune.training.dst import rigl, set_training, sparse_training, static_sparse
from jaxprune.training.ste import sr_ste, ste_params


def _torch_params(key=0):
    k = jax.random.split(jax.random.key(key), 3)
    return {"l1": {"weight": jax.random.normal(k[0], (16, 8)), "bias": jnp.zeros(16)},
            "l2": {"weight": jax.random.normal(k[1], (4, 16)), "bias": jnp.zeros(4)}}


def _torch_apply(p, x):  # PyTorch layout: weight (out, in), used as x @ W.T
    h = jax.nn.relu(x @ p["l1"]["weight"].T + p["l1"]["bias"])
    return h @ p["l2"]["weight"].T + p["l2"]["bias"]


def _mlp_params(key=0):
    k = jax.random.split(jax.random.key(key), 2)
    return {"a": {"kernel": jax.random.normal(k[0], (8, 16))},
            "b": {"kernel": jax.random.normal(k[1], (16, 4)), "bias": jnp.zeros(4)}}


def _mlp_loss(p, x):
    return jnp.mean((jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"] + p["b"]["bias"]) ** 2)


def _off_mask_nonzeros(params, masks):
    bad = 0
    for (_, m), (_, w) in zip(jp.masks.leaves_with_paths(masks), jp.masks.leaves_with_paths(params),
                              strict=True):
        if m is not None:
            bad += int((np.asarray(w)[~np.asarray(m)] != 0).sum())
    return bad


def _nnz(masks):
    return sum(int(m.sum()) for _, m in jp.masks.leaves_with_paths(masks) if m is not None)


@pytest.mark.parametrize("make_inner", [
    lambda: optax.multi_transform(
        {"x": optax.adam(1e-2), "y": optax.sgd(1e-2, momentum=0.9)},
        {"a": {"kernel": "x"}, "b": {"kernel": "y", "bias": "y"}}),
    lambda: optax.chain(
        optax.masked(optax.add_decayed_weights(0.1),
                     {"a": {"kernel": True}, "b": {"kernel": True, "bias": False}}),
        optax.adam(1e-2)),
], ids=["multi_transform", "masked"])
def test_rigl_wraps_multi_transform_and_masked(make_inner):
    # optax puts MaskedNode in the states of multi_transform / masked; resetting the regrown
    # entries' optimizer state used to fail with a pytree structure error
    params, x = _mlp_params(), jax.random.normal(jax.random.key(5), (8, 8))
    tx = rigl(make_inner(), 0.75, total_steps=40, update_period=2)
    st = tx.init(params)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(jax.grad(_mlp_loss)(p, x), s, p)))
    def adam_mu(state):  # the one adam first moment of 'a/kernel' (the other is a MaskedNode)
        found = optax.tree_utils.tree_get_all_with_path(
            state, "ScaleByAdamState", filtering=lambda _, v: isinstance(v, optax.ScaleByAdamState))
        mus = [s.mu["a"]["kernel"] for _, s in found
               if not isinstance(s.mu["a"]["kernel"], optax.MaskedNode)]
        assert len(mus) == 1
        return np.asarray(mus[0])

    p, nnz, checked = params, set(), 0
    for _ in range(9):
        old = jp.get_masks(st)
        p, st = step(p, st)
        new = jp.get_masks(st)
        assert _off_mask_nonzeros(p, new) == 0
        nnz.add(_nnz(new))
        grown = np.asarray(new["a"]["kernel"] & ~old["a"]["kernel"])
        if grown.any():  # regrown entries start with a zeroed adam state
            assert np.all(adam_mu(st)[grown] == 0)
            checked += 1
    assert len(nnz) == 1 and checked


def test_default_filter_selecting_nothing_warns():
    params = _torch_params()  # no leaf is named 'kernel'
    makers = {
        "rigl": lambda: rigl(optax.sgd(0.1), 0.9, total_steps=10).init(params),
        "static": lambda: static_sparse(optax.sgd(0.1), 0.9).init(params),
        "pruner": lambda: jp.gradual_magnitude(optax.sgd(0.1), 0.9, 0, 10, 1).init(params),
        "ste_masks": lambda: ste_params(params, pattern="2:4"),
        "snip": lambda: pai.snip(lambda p, b: jnp.sum(_torch_apply(p, b)), params,
                                 jnp.ones((1, 8)), 0.5),
    }
    for name, f in makers.items():
        with pytest.warns(UserWarning, match=f"{name}: the default filter .* selected no leaf"):
            f()


def test_opmap_traced_from_another_tree_is_refused():
    import flax.linen as nn

    model, x = nn.Dense(8), jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    wrong = jp.operator_map(model.apply, variables, x)  # paths 'params/kernel', tx sees 'kernel'
    params = variables["params"]
    for f in (lambda: jp.gradual_magnitude(optax.sgd(0.1), 0.5, 0, 10, opmap=wrong).init(params),
              lambda: rigl(optax.sgd(0.1), 0.5, total_steps=10, opmap=wrong).init(params),
              lambda: jp.prune(params, 0.5, opmap=wrong)):
        with pytest.raises(ValueError, match="none of the operator map's weights"):
            f()
    # an explicit filter with the wrong map would silently lose the matrix view (N:M axis)
    with pytest.raises(ValueError, match="'kernel' is not in the operator map"):
        jp.gradual_magnitude(optax.sgd(0.1), 0.5, 0, 10, pattern="2:4", opmap=wrong,
                             filter="kernel").init(params)
    right = jp.operator_map(lambda p, x: model.apply({"params": p}, x), params, x)
    masks = jp.get_masks(rigl(optax.sgd(0.1), 0.5, total_steps=10, opmap=right).init(params))
    assert masks["kernel"] is not None and int(masks["kernel"].sum()) == 16


def test_pytorch_layout_nm_along_fan_in_with_weight_decay():
    params, x = _torch_params(), jax.random.normal(jax.random.key(3), (8, 8))
    om = jp.operator_map(_torch_apply, params, x)
    tx = jp.gradual_magnitude(optax.chain(optax.clip_by_global_norm(1.0),
                                          optax.adamw(1e-2, weight_decay=0.5)),
                              0.5, 0, 4, 2, pattern="2:4", opmap=om)
    st, p = tx.init(params), params
    loss = lambda q: jnp.mean(_torch_apply(q, x) ** 2)  # noqa: E731
    for _ in range(10):
        u, st = tx.update(jax.grad(loss)(p), st, p)
        p = optax.apply_updates(p, u)
    masks = jp.get_masks(st)
    assert _off_mask_nonzeros(p, masks) == 0
    for path in ("l1/weight", "l2/weight"):
        m = dict(jp.masks.leaves_with_paths(masks))[path]
        # weight (out, in): groups of 4 run along axis 1 (the fan-in), 2 kept in each
        groups = np.asarray(m).reshape(m.shape[0], -1, 4).sum(-1)
        assert np.all(groups == 2), path


def test_sparsity_and_masks_together_are_refused():
    params = _mlp_params()
    masks = jax.tree.map(lambda m: None if m is None else jnp.eye(*m.shape, dtype=bool),
                         jp.masks.init_masks(params), is_leaf=lambda v: v is None)
    for f in (lambda: static_sparse(optax.sgd(0.1), 0.5, masks=masks),
              lambda: rigl(optax.sgd(0.1), 0.9, masks=masks, total_steps=10)):
        with pytest.raises(ValueError, match="pass sparsity or masks=, not both"):
            f()
    st = static_sparse(optax.sgd(0.1), masks=masks).init(params)
    assert _nnz(jp.get_masks(st)) == 8 + 4


@pytest.mark.parametrize("make", [
    lambda: rigl("adam", 0.5, total_steps=10),
    lambda: static_sparse(optax.adam, 0.5),
    lambda: set_training(lambda g: g, 0.5, total_steps=10),
    lambda: lt.keep_rewind_point("sgd", 1),
])
def test_inner_that_is_not_an_optimizer_is_refused(make):
    with pytest.raises(TypeError, match="inner must be an optax optimizer"):
        make()


def test_numpy_integer_periods_accepted_and_equal_to_python_ints():
    params, x = _mlp_params(), jax.random.normal(jax.random.key(1), (8, 8))

    def run(period, total):
        tx = rigl(optax.sgd(0.05), 0.75, update_period=period, total_steps=total)
        st, p = tx.init(params), params
        for _ in range(5):
            u, st = tx.update(jax.grad(_mlp_loss)(p, x), st, p)
            p = optax.apply_updates(p, u)
        return jp.get_masks(st)

    a, b = run(2, 20), run(np.int64(2), np.int32(20))
    assert all(bool(jnp.array_equal(u, v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                           strict=True))
    with pytest.raises(ValueError, match="update_period must be a positive"):
        rigl(optax.sgd(0.1), 0.5, update_period=np.int64(0), total_steps=10)
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda n: rigl(optax.sgd(0.1), 0.5, update_period=n, total_steps=10).init(
            params).count)(3)


def test_sr_ste_refuses_non_finite_decay():
    for bad in (float("inf"), float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="decay must be a finite float"):
            sr_ste(bad)
    tx = sr_ste(np.float32(0.5), pattern="2:4")
    p = {"kernel": jnp.array([[1.], [4.], [3.], [2.]])}
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    np.testing.assert_array_equal(np.asarray(u["kernel"][:, 0]), [0.5, 0.0, 0.0, 1.0])


def test_snip_grasp_nonfinite_errors_name_the_method():
    params = _mlp_params()
    nan_loss = lambda p, b: _mlp_loss(p, b) * jnp.nan  # noqa: E731
    for fn, name in ((pai.snip, "snip"), (pai.grasp, "grasp")):
        with pytest.raises(ValueError, match=f"{name} scores for 'a/kernel'") as e:
            fn(nan_loss, params, jnp.ones((2, 8)), 0.5)
        assert "SynFlow" not in str(e.value)


def test_grads_tree_mismatch_names_the_grads():
    params = _mlp_params()
    tx = rigl(optax.sgd(0.1), 0.5, total_steps=10)
    with pytest.raises(ValueError, match="grads tree does not match the params tree .*'b/bias'"):
        tx.update({"a": params["a"], "b": {"kernel": params["b"]["kernel"]}}, tx.init(params),
                  params)


def test_rigl_hand_computed_update_and_hint_agree():
    # one leaf, sgd(0): drop the k smallest |w| among active, grow the k largest |g| elsewhere
    m = jnp.array([[True, True, False, False], [True, False, True, False]])
    params = {"kernel": jnp.array([[1., -2., 0., 0.], [3., 0., 0.5, 0.]])}
    g = {"kernel": jnp.array([[0.1, 0.1, 5., -7.], [0.0, 0.2, 0.0, 1.]])}
    expect = np.array([[0, 1, 1, 1], [1, 0, 0, 0]], bool)
    for hint in (None, True):
        tx = sparse_training(optax.sgd(0.0), method="rigl", masks={"kernel": m},
                             drop_fraction=0.5, update_period=1, end_step=1000)
        st, p = tx.init(params), params
        for _ in range(2):  # count 0: no update; count 1: update with k = round(0.5 * 4) = 2
            kw = {} if hint is None else {"mask_update": hint}
            u, st = jax.jit(lambda g, s, p: tx.update(g, s, p, **kw))(g, st, p)
            p = optax.apply_updates(p, u)
        np.testing.assert_array_equal(np.asarray(jp.get_masks(st)["kernel"]), expect)
        np.testing.assert_array_equal(np.asarray(p["kernel"]),
                                      [[0., -2., 0., 0.], [3., 0., 0., 0.]])


def test_imp_warns_when_nothing_is_pruned():
    params = _torch_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="imp: the default filter"):
            lt.imp(params, lambda p, m: p, sparsity=0.5, rounds=1)
