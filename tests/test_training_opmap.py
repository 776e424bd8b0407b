"""Training-time transforms take the operator map: on models jaxprune never saw (DenseGeneral GQA,
einsum params, nnx, PyTorch layout) the pruner's and STE's N:M masks are valid on the matmul actually
performed (re-derived by the independent evaluator in tests/jaxpr_oracle.py) and DST's default filter
selects exactly the matmul weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune.core.masks import leaves_with_paths
from jaxprune.training import dst, pruning, ste
from tests import jaxpr_oracle as oracle
from tests.test_opmap import _setter
from tests.user_models import MAKERS, WEIGHTS


@pytest.fixture(scope="module", params=sorted(MAKERS))
def model(request):
    fn, params, x = MAKERS[request.param]()
    return request.param, fn, params, x, jp.operator_map(fn, params, x)


def _check_nm(name, fn, params, x, masks, n=2, m=4):
    pruned = {p for p, mk in leaves_with_paths(masks) if mk is not None}
    assert pruned == WEIGHTS[name]
    for path, mask in leaves_with_paths(masks):
        if mask is None:
            continue
        for v in oracle.matmul_views(fn, params, _setter(path), np.asarray(mask), x):
            assert oracle.nm_ok(v, n, m), f"{name}: {path} is not {n}:{m} along the contraction"


def test_pruner_nm_on_the_real_matmul(model):
    name, fn, params, x, om = model
    tx = pruning.pruner(optax.sgd(1e-3), schedule=jp.schedules.OneShot(0.5, step=0), pattern="2:4",
                        opmap=om)
    state = tx.init(params)
    loss = lambda p: jnp.mean(fn(p, x).astype(jnp.float32) ** 2)  # noqa: E731
    g = jax.grad(loss)(params)
    upd, state = tx.update(g, state, params)
    new = optax.apply_updates(params, upd)
    masks = jp.get_masks(state)
    _check_nm(name, fn, params, x, masks)
    for path, mk in leaves_with_paths(masks):
        if mk is not None:  # params exactly sparse after the step
            leaf = dict(leaves_with_paths(new))[path]
            assert not np.any(np.asarray(leaf)[~np.asarray(mk)]), path


def test_ste_masks_nm_on_the_real_matmul(model):
    name, fn, params, x, om = model
    _check_nm(name, fn, params, x, ste.ste_masks(params, pattern="2:4", opmap=om))
    sp, masks = ste.sparse_params(params, pattern="2:4", opmap=om)
    _check_nm(name, fn, params, x, masks)


def test_dst_default_filter_and_erk_from_the_map(model):
    name, fn, params, x, om = model
    tx = dst.rigl(optax.sgd(0.1), 0.8, total_steps=100, opmap=om)
    masks = jp.get_masks(tx.init(params))
    pruned = {p for p, mk in leaves_with_paths(masks) if mk is not None}
    assert pruned == WEIGHTS[name]
    total = sum(int(np.asarray(mk).size) for _, mk in leaves_with_paths(masks) if mk is not None)
    kept = sum(int(np.asarray(mk).sum()) for _, mk in leaves_with_paths(masks) if mk is not None)
    assert 1 - kept / total == pytest.approx(0.8, abs=0.01)


def test_training_refuses_a_non_map():
    with pytest.raises(TypeError, match="opmap must be a jaxprune.OperatorMap"):
        pruning.pruner(schedule=jp.schedules.OneShot(0.5), opmap={"w": 0})
    with pytest.raises(TypeError, match="opmap must be a jaxprune.OperatorMap"):
        dst.static_sparse(None, 0.5, opmap="map")
    with pytest.raises(TypeError, match="opmap must be a jaxprune.OperatorMap"):
        ste.ste_masks({"kernel": jnp.ones((4, 4))}, opmap=3)
