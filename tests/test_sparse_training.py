"""Tests for jaxprune.training.dst: static sparse, SET, RigL as optax transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.training import dst as st
from jaxprune.zoo.models import MLP, NnxMLP

ALL = lambda p, x: True  # noqa: E731


def _params():
    return MLP(features=(16, 10)).init(jax.random.key(0), jnp.zeros((1, 12)))["params"]


def _data(n=32):
    k1, k2 = jax.random.split(jax.random.key(1))
    return jax.random.normal(k1, (n, 12)), jax.random.randint(k2, (n,), 0, 10)


def _make_step(tx):
    model = MLP(features=(16, 10))

    def loss(p, x, y):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(loss)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def _counts(masks):
    return [int(m.sum()) for _, m in jp.masks.mask_leaves(masks)]


def _off_mask_zero(params, masks):
    for (_, p), (_, m) in zip(jp.masks.leaves_with_paths(params),
                              jp.masks.leaves_with_paths(masks), strict=True):
        if m is not None and np.any(np.asarray(p)[~np.asarray(m)] != 0):
            return False
    return True


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "lion": lambda: optax.lion(1e-3),
    "chain_inject": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    ),
}


@pytest.mark.parametrize(
    "method,opt",
    [("rigl", "sgd"), ("rigl", "chain_inject"), ("set", "sgd_momentum")],
)
def test_density_exact_and_params_sparse(method, opt):
    params = _params()
    tx = st.sparse_training(OPTIMIZERS[opt](), method=method, sparsity=0.7, update_period=3,
                            end_step=30, drop_fraction=0.5)
    state = tx.init(params)
    counts0 = _counts(state.masks)
    step = _make_step(tx)
    x, y = _data()
    changed = False
    for _ in range(10):
        old = state.masks
        params, state = step(params, state, x, y)
        assert _counts(state.masks) == counts0
        assert _off_mask_zero(params, state.masks)
        changed |= any(bool(jnp.any(a != b)) for (_, a), (_, b) in
                       zip(jp.masks.mask_leaves(old), jp.masks.mask_leaves(state.masks),
                           strict=True))
    assert changed, "masks never changed"
    # one compilation: mask-update steps and plain steps share the jitted function (lax.cond)
    assert step._cache_size() == 1


def _ones_like_state(inner, istate):
    return optax.tree_utils.tree_map_params(
        inner, lambda x: jnp.ones_like(x) if hasattr(x, "shape") else x, istate
    )


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam", "adamw", "lion", "chain_inject"])
def test_grown_weights_and_moments_zero(opt):
    params = _params()
    inner = OPTIMIZERS[opt]()
    tx = st.rigl(inner, sparsity=0.7, update_period=5, end_step=100, drop_fraction=0.3)
    state = tx.init(params)
    # give every weight stale nonzero moments, then jump to an update step
    state = state._replace(count=jnp.asarray(5, jnp.int32),
                           inner_state=_ones_like_state(inner, state.inner_state))
    old = state.masks
    x, y = _data()
    params, state = _make_step(tx)(params, state, x, y)
    grown = jax.tree.map(lambda n, o: n & ~o, state.masks["Dense_0"]["kernel"],
                         old["Dense_0"]["kernel"])
    assert int(grown.sum()) > 0
    assert np.all(np.asarray(params["Dense_0"]["kernel"])[np.asarray(grown)] == 0)
    seen = []

    def check(leaf, g):
        if hasattr(leaf, "shape") and leaf.shape == g.shape and leaf.ndim == 2:
            seen.append(leaf)
            assert np.all(np.asarray(leaf)[np.asarray(g)] == 0)
        return leaf

    flags = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params)
    flags["Dense_0"]["kernel"] = grown
    optax.tree_utils.tree_map_params(inner, check, state.inner_state, flags)
    assert seen, "no per-parameter optimizer state found"
    # entries active before and after keep their (nonzero) moments
    kept = np.asarray(state.masks["Dense_0"]["kernel"] & old["Dense_0"]["kernel"])
    assert any(np.any(np.asarray(leaf)[kept] != 0) for leaf in seen)


def test_rigl_grow_set_hand_computed():
    # 4 active entries with |w| = 4, 3, 2, 1; drop fraction ~0.5 -> drop the two smallest (2, 1)
    w = jnp.array([[4.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 1.0]])
    m = w != 0
    g = jnp.array([[0.0, 0.1, 0.0, 0.9], [0.5, 0.0, 0.7, 0.0]])
    tx = st.sparse_training(optax.sgd(0.0), method="rigl", masks={"w": m}, update_period=1,
                            end_step=10_000, drop_fraction=0.5)
    state = tx.init({"w": w})
    state = state._replace(count=jnp.asarray(1, jnp.int32))
    u, state = jax.jit(tx.update)({"w": g}, state, {"w": w})
    new = state.masks["w"]
    expected = jnp.array([[True, False, True, True], [False, False, True, False]])
    np.testing.assert_array_equal(new, expected)
    p = optax.apply_updates({"w": w}, u)["w"]
    np.testing.assert_array_equal(p, jnp.array([[4.0, 0, 3.0, 0], [0, 0, 0, 0]]))


def test_drop_grow_numpy_oracle():
    rng = np.random.default_rng(0)
    n = 24
    f_jit = jax.jit(lambda m, w, s, f: st.drop_grow({"w": m}, {"w": w}, {"w": s}, f))
    for _ in range(20):
        m = rng.random(n) < rng.uniform(0.2, 0.8)
        m[0] = True
        w = rng.normal(size=n) * m
        s = rng.random(n)
        f = float(rng.uniform(0.05, 0.95))
        new, grown = f_jit(jnp.asarray(m), jnp.asarray(w, jnp.float32),
                           jnp.asarray(s, jnp.float32), jnp.float32(f))
        k = int(np.round(np.float32(f) * np.float32(m.sum())))
        act = np.flatnonzero(m)
        kept = set(act[np.argsort(np.abs(w[act]), kind="stable")[k:]])
        cand = [i for i in range(n) if i not in kept]
        grow = set(sorted(cand, key=lambda i: -s[i])[:k])
        exp = np.zeros(n, bool)
        exp[list(kept | grow)] = True
        np.testing.assert_array_equal(np.asarray(new["w"]), exp)
        np.testing.assert_array_equal(np.asarray(grown["w"]), exp & ~m)


def _drop_grow_oracle(m, w, s, f):
    """numpy: drop the k smallest |w| of the active entries, grow the k best scores of the rest."""
    n = m.size
    k = int(np.round(np.float32(f) * np.float32(m.sum())))
    act = np.flatnonzero(m)
    kept = set(act[np.argsort(np.abs(w[act]), kind="stable")[k:]])
    cand = [i for i in range(n) if i not in kept]
    exp = np.zeros(n, bool)
    exp[list(kept | set(sorted(cand, key=lambda i: -s[i])[:k]))] = True
    return exp


def test_drop_grow_many_leaves_selected_together():
    """All leaves (equal and different sizes, one spanning several rows of the stacked layout) go
    through one selection; each must still get exactly its own per-leaf update (numpy oracle per
    leaf), an unpruned leaf untouched."""
    rng = np.random.default_rng(1)
    shapes = {"a": (4, 6), "b": (6, 4), "c": (2, 3, 4), "d": (5,), "e": (3, 3), "f": (40, 60)}
    f_jit = jax.jit(st.drop_grow)
    for _ in range(8):
        ms = {k: rng.random(sh) < rng.uniform(0.2, 0.8) for k, sh in shapes.items()}
        for v in ms.values():
            v.flat[0] = True
        ws = {k: (rng.normal(size=sh) * ms[k]).astype(np.float32) for k, sh in shapes.items()}
        ss = {k: rng.random(sh).astype(np.float32) for k, sh in shapes.items()}
        masks = {k: jnp.asarray(v) for k, v in ms.items()}
        masks["e"] = None  # a leaf that is not pruned
        f = float(rng.uniform(0.05, 0.95))
        new, grown = f_jit(masks, {k: jnp.asarray(v) for k, v in ws.items()},
                           {k: (None if masks[k] is None else jnp.asarray(v)) for k, v in ss.items()},
                           jnp.float32(f))
        assert new["e"] is None and grown["e"] is None
        for k in "abcdf":
            exp = _drop_grow_oracle(ms[k].ravel(), ws[k].ravel(), ss[k].ravel(), f)
            np.testing.assert_array_equal(np.asarray(new[k]).ravel(), exp, err_msg=k)
            np.testing.assert_array_equal(np.asarray(grown[k]).ravel(), exp & ~ms[k].ravel())
            assert new[k].shape == shapes[k]


def test_static_sparse_keeps_mask_and_erk():
    params = _params()
    tx = st.static_sparse(optax.adam(1e-2), sparsity=0.8, allocation="erk")
    state = tx.init(params)
    m0 = state.masks
    total = sum(m.size for _, m in jp.masks.mask_leaves(m0))
    assert sum(_counts(m0)) == pytest.approx(0.2 * total, abs=2)
    step = _make_step(tx)
    x, y = _data()
    for _ in range(3):
        params, state = step(params, state, x, y)
        assert all(bool(jnp.all(a == b)) for (_, a), (_, b) in
                   zip(jp.masks.mask_leaves(m0), jp.masks.mask_leaves(state.masks), strict=True))
        assert _off_mask_zero(params, state.masks)
    assert jp.get_masks(state) is state.masks


def test_positional_sparsity_and_erk_default_everywhere():
    params = _params()
    ref = st.sparse_init(params, 0.8, allocation="erk")
    for tx in (st.static_sparse(optax.sgd(0.1), 0.8),
               st.sparse_training(optax.sgd(0.1), 0.8, method="static"),
               st.set_training(optax.sgd(0.1), 0.8, total_steps=100),
               st.rigl(optax.sgd(0.1), sparsity=0.8, total_steps=100)):
        jax.tree.map(np.testing.assert_array_equal, tx.init(params).masks, ref)
    with pytest.raises(ValueError, match="rigl needs a sparsity"):
        st.rigl(optax.sgd(0.1), total_steps=100)


def test_non_update_step_is_inner_step_plus_select():
    """Between mask updates a SET step equals: masked grads -> inner update -> projection."""
    params = _params()
    inner = optax.adam(1e-2)
    tx = st.set_training(optax.adam(1e-2), 0.7, update_period=50, end_step=1000)
    state = tx.init(params)
    masks = state.masks
    x, y = _data()
    p1, s1 = _make_step(tx)(params, state, x, y)
    model = MLP(features=(16, 10))
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean())(params)
    u, istate = inner.update(jp.apply_masks(g, masks), inner.init(params), params)
    ref = jp.apply_masks(optax.apply_updates(params, u), masks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 s1.inner_state, istate)
    assert int(s1.count) == 1


def test_set_with_uniform_and_key_differs():
    params = _params()
    a = st.set_training(optax.sgd(0.1), sparsity=0.5, total_steps=100, allocation="uniform",
                        key=jax.random.key(1)).init(params)
    b = st.set_training(optax.sgd(0.1), sparsity=0.5, total_steps=100, allocation="uniform",
                        key=jax.random.key(2)).init(params)
    assert not bool(jnp.all(a.masks["Dense_0"]["kernel"] == b.masks["Dense_0"]["kernel"]))
    assert _counts(a.masks) == _counts(b.masks) == [96, 80]


@pytest.mark.parametrize("hinted", [False, True])
def test_nnx_optimizer(hinted):
    """RigL through nnx.Optimizer; ``hinted``: the step passes the host-told ``mask_update``."""
    model = NnxMLP(12, (16, 10), rngs=nnx.Rngs(0))
    tx = st.rigl(optax.adam(1e-2), sparsity=0.7, update_period=2, end_step=20,
                 filter=jp.filters.select(names=("kernel",)))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = _data()

    @nnx.jit(static_argnames="hint")
    def train_step(model, opt, x, y, hint=None):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        grads = nnx.grad(loss)(model)
        opt.update(model, grads, **({} if hint is None else {"mask_update": hint}))

    masks0 = jp.get_masks(nnx.as_pure(opt.opt_state))
    counts0 = _counts(masks0)
    for i in range(5):
        train_step(model, opt, x, y, (i % 2 == 0) if hinted else None)
        masks = jp.get_masks(nnx.as_pure(opt.opt_state))
        assert _counts(masks) == counts0
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        assert _off_mask_zero(params, masks)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), masks, masks0))


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_drop_fraction(frac):
    with pytest.raises(ValueError, match="drop_fraction must be in"):
        st.rigl(optax.sgd(0.1), sparsity=0.9, total_steps=100, drop_fraction=frac)


@pytest.mark.parametrize("period", [0, -5])
def test_bad_update_period(period):
    with pytest.raises(ValueError, match="update_period must be a positive int"):
        st.set_training(optax.sgd(0.1), sparsity=0.9, total_steps=100, update_period=period)


def test_bad_config_messages():
    with pytest.raises(ValueError, match="total_steps"):
        st.rigl(optax.sgd(0.1), sparsity=0.9)
    with pytest.raises(ValueError, match="sparsity"):
        st.rigl(optax.sgd(0.1), sparsity=1.0, total_steps=10)
    with pytest.raises(ValueError, match="unknown sparse-training method"):
        st.sparse_training(optax.sgd(0.1), method="snip", sparsity=0.5)
    tx = st.static_sparse(optax.sgd(0.1), masks={"w": jnp.ones((3,), bool)})
    with pytest.raises(ValueError, match="does not match"):
        tx.init({"v": jnp.ones(3)})
    tx = st.rigl(optax.sgd(0.1), sparsity=0.5, total_steps=10, filter=ALL)
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


def test_cosine_drop_fraction_zero_after_end():
    fr = [float(st.cosine_drop_fraction(t, 0.3, 100)) for t in (0, 25, 99, 100, 500)]
    assert fr[0] == pytest.approx(0.3) and fr[1] == pytest.approx(0.15 * (1 + np.cos(np.pi / 4)))
    assert fr[2] > 0 and fr[3] == 0 and fr[4] == 0


def _hinted_step(tx):
    model = MLP(features=(16, 10))

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                               y).mean()

    def step(p, s, x, y, hint=None):
        u, s = tx.update(jax.grad(loss)(p, x, y), s, p, mask_update=hint)
        return optax.apply_updates(p, u), s

    return jax.jit(step, static_argnames="hint")


@pytest.mark.parametrize("make", [
    lambda: st.set_training(optax.adam(1e-2), 0.7, update_period=3, end_step=100),
    lambda: st.rigl(optax.sgd(0.1, momentum=0.9), 0.7, update_period=3, end_step=100),
    lambda: optax.chain(optax.clip_by_global_norm(1.0),
                        st.rigl(optax.adam(1e-2), 0.7, update_period=3, end_step=100)),
    lambda: jp.training.gradual_magnitude(optax.adam(1e-2), 0.8, begin=0, end=9, freq=3),
])
def test_host_mask_update_hint_matches_device_schedule(make):
    """mask_update=(i % 3 == 0) from the host gives the masks and params of the lax.cond path."""
    tx = make()
    params = _params()
    step = _hinted_step(tx)
    x, y = _data()
    pa, sa = params, tx.init(params)
    pb, sb = params, tx.init(params)
    for i in range(10):
        pa, sa = step(pa, sa, x, y)
        pb, sb = step(pb, sb, x, y, hint=i % 3 == 0)
    ma, mb = jp.get_masks(sa), jp.get_masks(sb)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), ma, mb))
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), ma,
                                         jp.get_masks(tx.init(params))))  # masks did change
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), pa, pb)
    assert int(jp.training.get_prune_state(sa).count) == int(jp.training.get_prune_state(sb).count)
    assert _off_mask_zero(pb, mb)


def test_host_hint_false_defers_a_due_update_and_has_no_cond():
    tx = st.set_training(optax.adam(1e-2), 0.7, update_period=2, end_step=100)
    params = _params()
    step = _hinted_step(tx)
    x, y = _data()
    p, s = params, tx.init(params)
    for _ in range(5):  # count 2 is due: held there, masks unchanged
        p, s = step(p, s, x, y, hint=False)
    assert int(s.count) == 2
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), s.masks,
                                     tx.init(params).masks))
    p, s = step(p, s, x, y)  # the deferred update runs now
    assert int(s.count) == 3
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), s.masks,
                                         tx.init(params).masks))
    jaxpr = jax.make_jaxpr(lambda p, s: step.__wrapped__(p, s, x, y, False))(p, s)
    assert "cond" not in str(jaxpr)
    assert "cond" in str(jax.make_jaxpr(lambda p, s: step.__wrapped__(p, s, x, y))(p, s))


@pytest.mark.parametrize("hint", [1, 0, "yes", jnp.array(True)])
def test_bad_mask_update_hint(hint):
    tx = st.set_training(optax.sgd(0.1), 0.5, update_period=2, end_step=10)
    params = _params()
    with pytest.raises(ValueError, match="set_training: mask_update= must be None, True or False"):
        tx.update(params, tx.init(params), params, mask_update=hint)
    with pytest.raises(ValueError, match="traced value"):
        jax.jit(lambda p: tx.update(p, tx.init(params), p,
                                    mask_update=jnp.all(p["Dense_0"]["bias"] == 0)))(params)


def test_train_classifier_mask_update_every_matches_default():
    from jaxprune.zoo.loops import train_classifier

    x, y = (np.asarray(a) for a in _data(64))
    out = []
    for every in (None, 4):
        tx = st.rigl(optax.adam(1e-2), 0.7, update_period=4, end_step=100)
        params, state, _ = train_classifier(MLP(features=(16, 10)), tx, x, y, steps=9,
                                            batch_size=16, progress=False, mask_update_every=every)
        out.append((params, jp.get_masks(state), int(state.count)))
    assert out[0][2] == out[1][2] == 9
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), out[0][1], out[1][1]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 out[0][0], out[1][0])
    with pytest.raises(ValueError, match="mask_update_every must be a positive int"):
        train_classifier(MLP(features=(16, 10)), optax.sgd(0.1), x, y, steps=1,
                         mask_update_every=0, progress=False)


def test_drop_grow_density_exact_with_nonfinite_values():
    """NaN weights or -inf grow scores tie with the excluded entries no longer: density is kept
    (it used to shrink at every update once params were NaN)."""
    m = {"a": jnp.arange(64).reshape(8, 8) % 3 == 0, "b": jnp.arange(40).reshape(5, 8) % 2 == 0}
    p = {"a": jnp.where(jnp.arange(64).reshape(8, 8) % 5 == 0, jnp.nan, 1.0),
         "b": jnp.full((5, 8), jnp.nan)}
    g = {"a": jnp.full((8, 8), -jnp.inf), "b": jnp.where(jnp.arange(40).reshape(5, 8) < 7, jnp.nan,
                                                          -jnp.inf)}
    for frac in (0.3, 0.9):
        new, grown = jax.jit(st.drop_grow)(m, p, g, frac)
        assert _counts(new) == _counts(m)
        assert not any(bool(jnp.any(gr & mm)) for gr, mm in zip(
            jax.tree.leaves(grown), jax.tree.leaves(m), strict=True))


def test_keep_pruned_below_minus_inf_scores():
    """Under jit (where non-finite scores cannot be refused) entries kept pruned rank below live
    entries scored -inf or NaN."""
    kp = jnp.array([False, True, True, True, False, False])
    s = jnp.array([9., -jnp.inf, -jnp.inf, jnp.nan, 7., 8.])
    got = jax.jit(lambda s, kp: jp.pipeline.leaf_masks([s], [3], keep_pruned=[kp])[0])(s, kp)
    assert got.tolist() == [False, True, True, True, False, False]
    new = jax.jit(lambda m, s: jp.compute_masks(m, s, 0.5, keep_pruned=True))({"w": kp}, {"w": s})
    assert new["w"].tolist() == [False, True, True, True, False, False]  # keep 3 of 6
