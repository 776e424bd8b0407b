"""Allocation rules: uniform, ERK (vs a brute-force re-implementation of RigL's loop), global."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.core import allocation as A
from jaxprune.core.masks import leaves_with_paths


def _masks(shapes):
    return {f"l{i}": jnp.ones(s, bool) for i, s in enumerate(shapes)}


def _rigl_erk_reference(shapes, sparsity, kernel=True):
    """RigL's sparse_utils.get_sparsities_erdos_renyi, re-derived in plain Python."""
    dense = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for i, s in enumerate(shapes):
            n = math.prod(s)
            if i in dense:
                rhs -= n * sparsity
            else:
                rhs += n * (1 - sparsity)
                dims = s if kernel else s[-2:]
                raw[i] = sum(dims) / math.prod(dims)
                divisor += raw[i] * n
        eps = rhs / divisor
        mx = max(raw.values())
        if mx * eps > 1:
            for i, r in raw.items():
                if r == mx:
                    dense.add(i)
        else:
            break
    return [0.0 if i in dense else 1 - eps * raw[i] for i in range(len(shapes))]


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("kernel", [True, False])
def test_erk_matches_brute_force(sparsity, kernel):
    shapes = [(3, 3, 1, 32), (3, 3, 32, 64), (1024, 128), (128, 10)]
    out = A.ERK(kernel=kernel).allocate(_masks(shapes), sparsity)
    got = [float(out[f"l{i}"]) for i in range(len(shapes))]
    ref = _rigl_erk_reference(shapes, sparsity, kernel)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    total = sum(math.prod(s) for s in shapes)
    kept = sum((1 - g) * math.prod(s) for g, s in zip(got, shapes, strict=True))
    assert abs(kept - (1 - sparsity) * total) < 1e-3 * total


def test_erk_under_jit_with_traced_target():
    shapes = [(8, 8), (64, 64)]
    f = jax.jit(lambda t: A.ERK().allocate(_masks(shapes), t))
    np.testing.assert_allclose(float(f(0.9)["l1"]), _rigl_erk_reference(shapes, 0.9)[1],
                               atol=1e-5)


def test_uniform_and_overrides():
    masks = {"a": {"kernel": jnp.ones((4, 4), bool)}, "b": {"kernel": jnp.ones((4, 4), bool)},
             "c": None}
    out = A.Uniform(overrides=(("^b/", 0.25),)).allocate(masks, 0.5)
    assert float(out["a"]["kernel"]) == 0.5 and float(out["b"]["kernel"]) == 0.25
    assert out["c"] is None


def test_global_threshold_and_floor():
    scores = {"a": jnp.arange(1.0, 101.0).reshape(10, 10),
              "b": jnp.arange(1001.0, 1101.0).reshape(10, 10)}
    masks = jax.tree.map(lambda s: jnp.ones(s.shape, bool), scores)
    # without a floor, 50% global sparsity removes all of 'a' (layer collapse)
    out = A.Global(min_density=0.0).allocate(masks, 0.5, scores)
    assert float(out["a"]) == 1.0 - 0.0 and float(out["b"]) == 0.0
    out = A.Global(min_density=0.1).allocate(masks, 0.5, scores)
    assert float(out["a"]) == pytest.approx(0.9) and float(out["b"]) == pytest.approx(0.1)
    kept = sum((1 - float(v)) * 100 for _, v in leaves_with_paths(out))
    assert kept == pytest.approx(100)


def test_global_random_scores_total_exact():
    k = jax.random.split(jax.random.key(0), 3)
    scores = {f"l{i}": jax.random.uniform(k[i], s) for i, s in
              enumerate([(16, 8), (32, 32), (7, 5)])}
    masks = jax.tree.map(lambda s: jnp.ones(s.shape, bool), scores)
    out = jax.jit(lambda t: A.Global(min_density=0.0).allocate(masks, t, scores))(0.7)
    flat = np.concatenate([np.asarray(v).ravel() for v in scores.values()])
    thr = np.sort(flat)[::-1][int(round(0.3 * flat.size)) - 1]
    for name, s in scores.items():
        exp = 1 - (np.asarray(s) >= thr).sum() / s.size
        assert float(out[name]) == pytest.approx(exp, abs=1e-6)


def test_bad_sparsity_values():
    with pytest.raises(ValueError, match=r"'<target>' must be in \[0, 1\), got 1.0"):
        A.Uniform().allocate(_masks([(2, 2)]), 1.0)
    with pytest.raises(ValueError, match="override 'x'.*got -0.1"):
        A.Uniform(overrides=(("x", -0.1),))
    with pytest.raises(ValueError, match="unknown allocation"):
        A.get("nope")


def _global_oracle(scores: dict, target: float, min_density: float) -> dict:
    """Per-leaf kept counts by brute force: each leaf's floor first, then the best remaining
    entries of all leaves; ties by (leaf order, index)."""
    names = sorted(scores)
    total = sum(np.size(scores[n]) for n in names)
    budget = total - int(np.round(np.float32(target) * total))
    keep = {}
    for n in names:
        v = np.asarray(scores[n]).ravel()
        order = np.lexsort((np.arange(v.size), -v))
        keep[n] = np.zeros(v.size, bool)
        keep[n][order[:min(v.size, int(np.ceil(min_density * v.size)))]] = True
    extra = budget - sum(int(k.sum()) for k in keep.values())
    cand = sorted((-float(np.asarray(scores[n]).ravel()[j]), i, j)
                  for i, n in enumerate(names) for j in range(keep[n].size) if not keep[n][j])
    for _, i, j in cand[:max(extra, 0)]:
        keep[names[i]][j] = True
    return {n: int(keep[n].sum()) for n in names}


@pytest.mark.parametrize("min_density", [0.0, 0.01, 0.3])
def test_global_exact_counts_with_tied_scores(min_density):
    # a global threshold with scores tied at it kept nothing: 0.5 of all-equal scores pruned
    # every entry (SynFlow on a constant init did); ties now fill the budget in leaf order
    rng = np.random.default_rng(0)
    shapes = {"a": (4, 6), "b": (3, 3), "c": (8,)}
    masks = {n: jnp.ones(s, bool) for n, s in shapes.items()}
    for trial in range(12):
        sc = {n: jnp.asarray(rng.integers(0, 1 + trial % 4, s).astype(np.float32))
              for n, s in shapes.items()}
        for target in (0.3, 0.5, 0.9):
            out = jp.compute_masks(masks, sc, target, jp.Global(min_density=min_density))
            got = {n: int(out[n].sum()) for n in shapes}
            assert got == _global_oracle(sc, target, min_density), (trial, target, sc)


def test_global_all_equal_scores_keep_the_exact_count():
    p = {"a": {"kernel": jnp.ones((4, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    pruned, masks = jp.prune(p, 0.5, allocation="global")
    assert float(jp.total_sparsity(pruned, masks)) == 0.5
