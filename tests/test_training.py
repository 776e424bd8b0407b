"""The pruner Optax transform: exact zeros after every step, composition, jit, linen/nnx/dict."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.core import schedules as S
from jaxprune.zoo.models import MLP, NnxMLP

X = jax.random.normal(jax.random.key(1), (32, 16))
Y = jax.random.randint(jax.random.key(2), (32,), 0, 4)


def _loss_linen(params):
    logits = MLP((32, 32, 4)).apply({"params": params}, X)
    return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def _inner():
    # adam + weight decay + momentum: every term that could move a pruned weight off zero
    return optax.chain(optax.add_decayed_weights(1e-2), optax.trace(0.9), optax.adam(1e-2))


def _check_exact_zeros(params, masks, require_pruned=True):
    for (path, p), (_, m) in zip(jp.masks.leaves_with_paths(params),
                                 jp.masks.leaves_with_paths(masks), strict=True):
        if m is not None:
            off = np.asarray(p)[~np.asarray(m)]
            assert off.size > 0 or not require_pruned, path
            assert (off == 0.0).all(), f"{path}: {np.abs(off).max()}"


SCHED = S.Polynomial(0.8, begin=0, end=60, freq=10)


def test_linen_100_steps_exactly_zero_every_step():
    params = MLP((32, 32, 4)).init(jax.random.key(0), X)["params"]
    tx = jp.pruner(_inner(), schedule=SCHED)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(_loss_linen)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for t in range(100):
        params, state = step(params, state)
        _check_exact_zeros(params, jp.get_masks(state), require_pruned=t >= 10)
    assert jp.total_sparsity(params, jp.get_masks(state)) == pytest.approx(0.8, abs=1e-3)
    for path, m in jp.masks.leaves_with_paths(jp.get_masks(state)):
        if m is not None:
            assert (~np.asarray(m)).sum() == round(0.8 * m.size), path  # exact count


def test_plain_dict_and_lists():
    params = {"layers": [{"kernel": jax.random.normal(jax.random.key(i), (16, 16)),
                          "bias": jnp.zeros(16)} for i in range(2)]}

    def loss(p):
        h = X
        for layer in p["layers"]:
            h = jnp.tanh(h @ layer["kernel"] + layer["bias"])
        return jnp.mean(h**2)

    tx = jp.pruner(_inner(), schedule=SCHED)
    state = tx.init(params)
    step = jax.jit(lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
        tx.update(jax.grad(loss)(p), s, p)))
    for _ in range(100):
        params, state = step(params, state)
        _check_exact_zeros(params, jp.get_masks(state), require_pruned=False)


def test_nnx_optimizer_100_steps():
    model = NnxMLP(16, (32, 32, 4), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, jp.pruner(_inner(), schedule=SCHED), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()

        opt.update(model, nnx.grad(loss)(model))

    for _ in range(100):
        step(model, opt)
        _check_exact_zeros(nnx.state(model, nnx.Param), jp.get_masks(opt.opt_state),
                           require_pruned=False)
    k = np.asarray(model.layers[0].kernel[...])
    assert (k == 0).mean() == pytest.approx(0.8, abs=1e-3)


def test_jit_equals_eager():
    params = MLP((32, 32, 4)).init(jax.random.key(0), X)["params"]
    tx = jp.pruner(optax.adam(1e-2), schedule=S.Polynomial(0.5, 0, 6, freq=2))

    def run(jit):
        p, s = params, tx.init(params)
        upd = jax.jit(tx.update) if jit else tx.update
        for _ in range(8):
            u, s = upd(jax.grad(_loss_linen)(p), s, p)
            p = optax.apply_updates(p, u)
        return p, jp.get_masks(s)

    (pj, mj), (pe, me) = run(True), run(False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), pj, pe)
    jp.masks.tree_map_masked(
        lambda a, b: None if a is None else np.testing.assert_array_equal(a, b), mj, me)


@pytest.mark.parametrize("wrap", ["chain", "multisteps_outer", "multisteps_inner", "inject"])
def test_composes_with_optax(wrap):
    params = MLP((32, 32, 4)).init(jax.random.key(0), X)["params"]
    sched = S.Polynomial(0.6, 0, 20, freq=4)
    if wrap == "chain":
        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         jp.pruner(optax.adamw(1e-2, weight_decay=0.1), schedule=sched))
    elif wrap == "multisteps_outer":
        tx = optax.MultiSteps(jp.pruner(optax.adam(1e-2), schedule=sched), every_k_schedule=2)
    elif wrap == "multisteps_inner":
        tx = jp.pruner(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2), schedule=sched)
    else:
        tx = jp.pruner(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), schedule=sched)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(_loss_linen)(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(50):
        params, state = step(params, state)
        _check_exact_zeros(params, jp.get_masks(state), require_pruned=False)
    assert jp.total_sparsity(params, jp.get_masks(state)) == pytest.approx(0.6, abs=1e-3)


def test_chained_after_optimizer_without_inner():
    params = MLP((32, 32, 4)).init(jax.random.key(0), X)["params"]
    tx = optax.chain(optax.adam(1e-2), jp.pruner(schedule=S.OneShot(0.5, 3)))
    state = tx.init(params)
    for _ in range(6):
        u, state = tx.update(jax.grad(_loss_linen)(params), state, params)
        params = optax.apply_updates(params, u)
    _check_exact_zeros(params, jp.get_masks(state))


@pytest.mark.parametrize("crit", ["saliency", "taylor", "movement", "random"])
def test_gradient_and_stateful_criteria(crit):
    params = MLP((32, 32, 4)).init(jax.random.key(0), X)["params"]
    tx = jp.pruner(optax.sgd(0.05), schedule=S.Polynomial(0.5, 0, 10, freq=5), criterion=crit,
                   key=jax.random.key(0))
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss_linen)(p), s, p))
    for _ in range(12):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
    assert jp.total_sparsity(params, jp.get_masks(state)) == pytest.approx(0.5, abs=1e-3)
    _check_exact_zeros(params, jp.get_masks(state))


def test_nm_training_keeps_valid_groups():
    params = MLP((32, 32, 4)).init(jax.random.key(0), X)["params"]
    tx = jp.pruner(optax.adam(1e-2), schedule=S.Polynomial(0.5, 0, 10, freq=2), pattern="2:4")
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss_linen)(p), s, p))
    for _ in range(15):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
    for path, m in jp.masks.leaves_with_paths(jp.get_masks(state)):
        if m is not None:
            assert jp.patterns.nm_valid(m, 2, 4), path


def test_errors():
    with pytest.raises(ValueError, match="needs key="):
        jp.pruner(optax.sgd(0.1), schedule=SCHED, criterion="random")
    tx = jp.pruner(optax.sgd(0.1), schedule=S.Polynomial(0.5, 0, 60, freq=10), pattern="2:4")
    with pytest.raises(ValueError, match="'l/kernel'.*not divisible by m=4"):
        tx.init({"l": {"kernel": jnp.ones((6, 3))}})
    tx = jp.pruner(optax.sgd(0.1), schedule=SCHED)
    st = tx.init({"l": {"kernel": jnp.ones((4, 4))}})
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"l": {"kernel": jnp.ones((4, 4))}}, st)
    with pytest.raises(ValueError, match="expected one PruneState"):
        jp.get_masks(optax.adam(1e-3).init({"a": jnp.ones(2)}))


def test_matches_hand_written_reference():
    """The wrapper against a direct loop: inner adam, masks recomputed from |p + u| at the
    schedule's steps through compute_masks, params masked after every step."""
    params = MLP((32, 32, 4)).init(jax.random.key(0), X)["params"]
    sched = S.Polynomial(0.7, 0, 12, freq=3)
    tx = jp.pruner(optax.adam(1e-2), schedule=sched)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss_linen)(p), s, p))
    inner = optax.adam(1e-2)
    p, s = params, tx.init(params)
    rp, rs, rm = params, inner.init(params), jp.init_masks(params)
    for t in range(16):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
        g = jax.grad(_loss_linen)(rp)
        ru, rs = inner.update(g, rs, rp)
        new = optax.apply_updates(rp, ru)
        if bool(sched.should_update(t)):
            rm = jp.compute_masks(rm, jp.criteria.magnitude(new, rm), sched.sparsity_at(t))
        rp = jp.apply_masks(new, rm)
        jp.masks.tree_map_masked(
            lambda a, b: None if a is None else np.testing.assert_array_equal(a, b),
            jp.get_masks(s), rm)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p, rp)
    assert int(s.count) == 16


def test_gradual_magnitude_vocabulary_and_unreachable_target():
    tx = jp.gradual_magnitude(optax.sgd(0.1), sparsity=0.5, begin=0, end=4, freq=2, pattern="2:4")
    assert jp.get_masks(tx.init({"k": {"kernel": jnp.ones((4, 4))}}))["k"]["kernel"].shape == (4, 4)
    # a target the pattern cannot reach fails at construction, not silently at 0.5
    with pytest.raises(ValueError, match="sparsity 0.9 is above what pattern 2:4 can reach"):
        jp.gradual_magnitude(optax.sgd(0.1), 0.9, begin=0, end=10, pattern="2:4")
    with pytest.raises(ValueError, match="above what pattern 1:4 can reach"):
        jp.pruner(optax.sgd(0.1), schedule=S.Iterative((0, 5), (0.5, 0.8)), pattern="1:4")
    with pytest.raises(TypeError):
        jp.gradual_magnitude(optax.sgd(0.1), target=0.5, begin=0, end=10)  # old keyword


def test_get_prune_state_nested_and_ambiguous():
    params = {"l": {"kernel": jnp.ones((4, 4))}}
    tx = jp.training.keep_rewind_point(
        optax.chain(optax.clip(1.0), jp.pruner(optax.sgd(0.1), schedule=SCHED)), step=0)
    assert jp.get_prune_state(tx.init(params)).masks["l"]["kernel"].shape == (4, 4)
    assert int(jp.training.get_rewind_state(tx.init(params)).step) == 0
    two = optax.chain(jp.pruner(schedule=SCHED), jp.pruner(schedule=SCHED))
    with pytest.raises(ValueError, match=r"expected one PruneState .* found 2: at \[0\], \[1\]"):
        jp.get_masks(two.init(params))
