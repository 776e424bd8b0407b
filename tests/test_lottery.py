"""Tests for jaxprune.training.lottery: IMP rounds, rewinding, the rewind point in optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.training import lottery as lt
from jaxprune.training.dst import static_sparse
from jaxprune.zoo.models import MLP
from tests.user_models import nnx_mlp_task


def _setup():
    model = MLP(features=(16, 10))
    params = model.init(jax.random.key(0), jnp.zeros((1, 12)))["params"]
    x = jax.random.normal(jax.random.key(1), (32, 12))
    y = jax.random.randint(jax.random.key(2), (32,), 0, 10)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y).mean()

    return model, params, loss


def _make_train(loss, steps=6, rewind_step=None):
    """A train(params, masks) using static_sparse (fixed mask) and optionally a rewind point."""

    def make_step(tx):
        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s
        return step

    def train(params, masks):
        tx = static_sparse(optax.sgd(0.1, momentum=0.9), masks=masks)
        if rewind_step is not None:
            tx = lt.keep_rewind_point(tx, rewind_step)
        s = tx.init(params)
        step = make_step(tx)
        for _ in range(steps):
            params, s = step(params, s)
        return lt.Trained(params, s)

    return train


def test_imp_round_sparsity_and_monotone_masks():
    _, params, loss = _setup()
    target, rounds = 1 - 0.7**4, 4
    res = lt.imp(params, _make_train(loss, steps=3), sparsity=target, rounds=rounds)
    assert len(res.rounds) == rounds + 1
    prev = None
    for r in res.rounds:
        s = lt.imp_sparsity(target, r.round, rounds)
        # the same schedule as pruning 30% of the remaining weights per round
        assert s == pytest.approx(1 - 0.7**r.round, abs=1e-12)
        for path, m in jp.masks.mask_leaves(r.masks):
            assert int((~m).sum()) == int(np.round(np.float32(s) * m.size)), (path, r.round)
            if prev is not None:
                old = dict(jp.masks.mask_leaves(prev))[path]
                assert not bool(jnp.any(m & ~old)), "IMP revived a pruned weight"
        # trained params respect the round's mask
        assert jp.total_sparsity(r.trained, r.masks) == pytest.approx(r.sparsity)
        for (_, p), (_, m) in zip(jp.masks.leaves_with_paths(r.trained),
                                  jp.masks.leaves_with_paths(r.masks), strict=True):
            if m is not None:
                assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
        prev = r.masks


def test_imp_masks_numpy_oracle():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5)).astype(np.float32)
    m = rng.random((6, 5)) < 0.7
    new = lt.imp_masks({"kernel": jnp.asarray(w)}, {"kernel": jnp.asarray(m)}, 0.6)["kernel"]
    n_prune = int(round(0.6 * 30))
    score = np.where(m, np.abs(w), -1).ravel()
    order = np.argsort(score, kind="stable")
    exp = np.ones(30, bool)
    exp[order[:n_prune]] = False
    np.testing.assert_array_equal(np.asarray(new).ravel(), exp)


def test_imp_pruned_entry_with_huge_weight_stays_pruned():
    w = jnp.array([[5.0, 1.0], [3.0, 2.0], [4.0, 0.5]])
    m = jnp.array([[True, True], [True, True], [False, True]])
    huge = w.at[2, 0].set(1e6)  # a train that ignored the mask: the pruned entry grew huge
    new = lt.imp_masks({"kernel": huge}, {"kernel": m}, 0.5)["kernel"]
    np.testing.assert_array_equal(new, [[True, False], [True, True], [False, False]])
    # the whole driver: train returns dense params with huge values everywhere it pruned
    def train(params, masks):
        return jax.tree.map(lambda p, mm: jnp.where(mm, p, 1e6), params, masks)

    init = {"kernel": jax.random.normal(jax.random.key(0), (8, 8))}
    res = lt.imp(init, train, sparsity=0.9, rounds=3, filter=lambda p, x: True)
    for a, b in zip(res.rounds, res.rounds[1:], strict=False):
        assert not bool(jnp.any(b.masks["kernel"] & ~a.masks["kernel"])), "IMP revived a weight"
    assert int((~res.rounds[-1].masks["kernel"]).sum()) == round(0.9 * 64)


def test_imp_sparsity_equals_old_fraction_schedule():
    # fraction f per round over R rounds == final sparsity 1 - (1 - f)^R
    f, rounds = 0.2, 5
    for r in range(rounds + 1):
        assert lt.imp_sparsity(1 - (1 - f) ** rounds, r, rounds) == pytest.approx(1 - (1 - f) ** r)


def test_rewind_to_init_restores_exact_values():
    _, params, loss = _setup()
    res = lt.imp(params, _make_train(loss, steps=3), sparsity=0.75, rounds=2)
    for r in res.rounds[1:]:
        for (_, s), (_, i), (_, m) in zip(jp.masks.leaves_with_paths(r.start),
                                          jp.masks.leaves_with_paths(params),
                                          jp.masks.leaves_with_paths(r.masks), strict=True):
            if m is None:
                np.testing.assert_array_equal(s, i)
            else:
                np.testing.assert_array_equal(np.asarray(s), np.where(m, i, 0))
    np.testing.assert_array_equal(res.ticket["Dense_0"]["bias"], params["Dense_0"]["bias"])


def test_late_rewinding_uses_saved_step():
    _, params, loss = _setup()
    k = 2
    train = _make_train(loss, steps=5, rewind_step=k)
    # reference: the params after exactly k steps of the dense run
    ref = train(params, jp.init_masks(params))  # same deterministic run
    ref_k = _make_train(loss, steps=k)(params, jp.init_masks(params)).params
    got = lt.get_rewind_point(ref.opt_state)
    jax.tree.map(np.testing.assert_array_equal, got, ref_k)
    res = lt.imp(params, train, sparsity=0.5, rounds=1, rewind_to=k)
    jax.tree.map(np.testing.assert_array_equal, res.rewind_params, ref_k)
    start, m = res.rounds[1].start, res.rounds[1].masks
    np.testing.assert_array_equal(
        np.asarray(start["Dense_1"]["kernel"]),
        np.where(m["Dense_1"]["kernel"], ref_k["Dense_1"]["kernel"], 0))


def test_lr_rewinding_keeps_trained_weights():
    _, params, loss = _setup()
    res = lt.imp(params, _make_train(loss, steps=3), sparsity=0.5, rounds=1, rewind_to="lr")
    r0, r1 = res.rounds
    np.testing.assert_array_equal(
        np.asarray(r1.start["Dense_0"]["kernel"]),
        np.where(r1.masks["Dense_0"]["kernel"], r0.trained["Dense_0"]["kernel"], 0))


def test_rewind_point_exact_step_count_and_errors():
    tx = lt.keep_rewind_point(optax.sgd(1.0), step=3)
    p = {"w": jnp.zeros(2)}
    s = tx.init(p)
    for _ in range(2):
        u, s = tx.update({"w": -jnp.ones(2)}, s, p)
        p = optax.apply_updates(p, u)
    with pytest.raises(ValueError, match="rewind step 3 is beyond the 2 steps trained"):
        lt.get_rewind_point(s)
    u, s = tx.update({"w": -jnp.ones(2)}, s, p)
    p = optax.apply_updates(p, u)
    # exactly 3 steps: the final params are the rewind point
    np.testing.assert_array_equal(lt.get_rewind_point(s, p)["w"], [3.0, 3.0])
    with pytest.raises(ValueError, match="rewind step must be"):
        lt.keep_rewind_point(optax.sgd(1.0), step=-1)


def test_imp_rewind_beyond_training_raises():
    _, params, loss = _setup()
    with pytest.raises(ValueError, match="beyond the 3 steps trained"):
        lt.imp(params, _make_train(loss, steps=3, rewind_step=10), sparsity=0.2, rounds=1,
               rewind_to=10)
    with pytest.raises(ValueError, match=r"IMP sparsity must be a float in \(0, 1\), got 1.0"):
        lt.imp(params, _make_train(loss), sparsity=1.0, rounds=1)
    with pytest.raises(ValueError, match="needs an explicit sparsity"):
        lt.imp(params, _make_train(loss), rounds=1)
    with pytest.raises(ValueError, match="above what pattern 2:4 can reach"):
        lt.imp(params, _make_train(loss), sparsity=0.8, rounds=2, pattern="2:4")
    with pytest.raises(ValueError, match="rounds must be"):
        lt.imp(params, _make_train(loss), sparsity=0.5, rounds=0)
    with pytest.raises(ValueError, match="rewind_to must be"):
        lt.imp(params, _make_train(loss), sparsity=0.5, rounds=1, rewind_to="start")
    with pytest.raises(ValueError, match="needs train to return"):
        lt.imp(params, lambda p, m: p, sparsity=0.5, rounds=1, rewind_to=2)


def test_nnx_imp_with_optimizer_rewind_point():
    graphdef, init_state, x, y = nnx_mlp_task(12, (16, 10), 32)

    def train(params, masks):
        m = nnx.merge(graphdef, params)
        tx = lt.keep_rewind_point(static_sparse(optax.adam(1e-2), masks=masks), 1)
        opt = nnx.Optimizer(m, tx, wrt=nnx.Param)

        @nnx.jit
        def step(m, opt):
            g = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
                m(x), y).mean())(m)
            opt.update(m, g)

        for _ in range(3):
            step(m, opt)
        return lt.Trained(nnx.state(m, nnx.Param), nnx.as_pure(opt.opt_state))

    res = lt.imp(init_state, train, sparsity=0.75, rounds=2, rewind_to=1)
    assert [r.sparsity for r in res.rounds] == [0.0, 0.5, 0.75]
    for r in res.rounds[1:]:
        assert jp.total_sparsity(r.trained, r.masks) == pytest.approx(r.sparsity)
