"""Patterns: exact counts, N:M validity, blocks, channels, tie-breaking; hypothesis properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.core import patterns as P
from jaxprune.core import topk

SETTINGS = settings(max_examples=25, deadline=None)
# Shapes come from small fixed sets: each new shape costs an XLA compile, while values, ties and
# sparsities (the interesting part) vary freely.
SIZES = st.sampled_from([1, 2, 3, 7, 16, 61, 200])


def _np_topk(scores: np.ndarray, k: int) -> np.ndarray:
    # oracle: stable sort by (-score, index); keep the first k
    order = np.lexsort((np.arange(scores.size), -scores))
    keep = np.zeros(scores.size, bool)
    keep[order[:k]] = True
    return keep


@SETTINGS
@given(
    SIZES.flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(-3, 3).map(float), min_size=n, max_size=n),
            st.floats(0.0, 0.999),
        )
    )
)
def test_unstructured_exact_count_and_ties(args):
    vals, s = args
    scores = np.asarray(vals, np.float32)
    m = np.asarray(P.Unstructured().mask(jnp.asarray(scores), s))
    n_pruned = int(np.round(np.float32(s) * scores.size))
    assert (~m).sum() == n_pruned
    np.testing.assert_array_equal(m, _np_topk(scores, scores.size - n_pruned))


_TOPK = jax.jit(P.topk_mask)


@SETTINGS
@given(
    st.sampled_from([5, 64, 1000]).flatmap(
        lambda n: st.tuples(
            st.lists(
                st.one_of(
                    st.sampled_from([-np.inf, np.inf, 0.0, -0.0, 1.0, 1e-30, -1e30]),
                    st.floats(-1e6, 1e6, allow_nan=False, width=32),
                ),
                min_size=n, max_size=n,
            ),
            st.integers(0, n),
        )
    )
)
def test_topk_search_matches_sort_oracle(args):
    # the interpolating threshold search (early stop, bisection fallback) against a stable sort:
    # infinities, signed zeros, heavy ties, values over 36 orders of magnitude, every k
    vals, k = args
    scores = np.asarray(vals, np.float32)
    got = np.asarray(_TOPK(jnp.asarray(scores), k))
    # the oracle ranks -0.0 and 0.0 equal, as sortable_key does
    np.testing.assert_array_equal(got, _np_topk(scores + np.float32(0.0), k))


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.sampled_from([1, 5, 1023, 1025, 2500]), min_size=1, max_size=4).flatmap(
        lambda sizes: st.tuples(
            st.just(sizes),
            st.lists(st.integers(0, 10**6), min_size=len(sizes), max_size=len(sizes)),
            st.integers(0, 2**31 - 1),
        )
    )
)
def test_topk_masks_several_leaves_match_per_leaf_oracle(args):
    # leaves of different sizes selected together (rows of the stacked layout, a leaf spanning
    # rows): each leaf gets exactly its own top-k, ties (few distinct values, -inf) by index
    sizes, ks, seed = args
    rng = np.random.default_rng(seed)
    scores = [np.where(rng.random(n) < 0.3, -np.inf, rng.integers(0, 4, n)).astype(np.float32)
              for n in sizes]
    ks = [k % (n + 1) for k, n in zip(ks, sizes, strict=True)]
    got = P.topk_masks([jnp.asarray(s) for s in scores], ks)
    for s, k, g in zip(scores, ks, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), _np_topk(s, k))


def test_topk_masks_groups_and_count_true(monkeypatch):
    # many arrays split into several selections (small group limits here) give the same masks
    rng = np.random.default_rng(3)
    sizes = [5, 1500, 7, 7, 2100, 1, 64]
    scores = [rng.integers(0, 6, n).astype(np.float32) for n in sizes]
    ks = [int(rng.integers(0, n + 1)) for n in sizes]
    monkeypatch.setattr(topk, "_GROUP_ENTRIES", 2000)
    monkeypatch.setattr(topk, "_GROUP_ARRAYS", 3)
    assert topk._groups(sizes) == [[0, 1, 2], [3], [4], [5, 6]]
    got = P.topk_masks([jnp.asarray(s) for s in scores], ks)
    for s, k, g in zip(scores, ks, got, strict=True):
        np.testing.assert_array_equal(np.asarray(g), _np_topk(s, k))
    masks = [s > 2 for s in scores] + [np.zeros((0,), bool)]
    np.testing.assert_array_equal(np.asarray(P.count_true([jnp.asarray(m) for m in masks])),
                                  [m.sum() for m in masks])


def test_topk_masks_bad_inputs():
    with pytest.raises(ValueError, match="2 score arrays and 1 counts"):
        P.topk_masks([jnp.ones(3), jnp.ones(2)], [1])
    with pytest.raises(ValueError, match=r"array 1 has shape \(2, 2\)"):
        P.topk_masks([jnp.ones(3), jnp.ones((2, 2))], [1, 1])
    assert P.topk_masks([], []) == []


def test_topk_traced_k_under_jit():
    f = jax.jit(P.topk_mask)
    x = jnp.array([0.5, 0.1, 0.9, 0.9, 0.3])
    for k in range(6):
        np.testing.assert_array_equal(f(x, k), _np_topk(np.asarray(x), k))


@SETTINGS
@given(
    n_m=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 8)]),
    groups=st.sampled_from([1, 3, 6]),
    out=st.sampled_from([1, 5]),
    seed=st.integers(0, 1000),
)
def test_nm_validity_dense_kernel(n_m, groups, out, seed):
    n, m = n_m
    scores = jax.random.normal(jax.random.key(seed), (groups * m, out))
    mask = P.NM(n, m).mask(scores, 1 - n / m)
    assert P.nm_valid(mask, n, m)
    # exactly n kept per group along axis 0 (contraction axis of a Dense kernel)
    g = np.asarray(mask).reshape(groups, m, out)
    assert (g.sum(axis=1) == n).all()
    # the kept ones are the top-n in each group
    sg = np.asarray(scores).reshape(groups, m, out)
    for gi in range(groups):
        for o in range(out):
            np.testing.assert_array_equal(g[gi, :, o], _np_topk(sg[gi, :, o], n))


def test_nm_conv_groups_along_in_channels():
    scores = jax.random.normal(jax.random.key(0), (3, 3, 8, 5))
    mask = np.asarray(P.NM(2, 4).mask(scores, 0.5))
    grouped = mask.reshape(3, 3, 2, 4, 5).sum(axis=3)
    assert (grouped == 2).all()


def test_nm_gradual_intermediate_sparsity():
    scores = jax.random.normal(jax.random.key(1), (16, 4))
    m = np.asarray(P.NM(2, 4).mask(scores, 0.25))  # 3 of 4 kept
    assert (m.reshape(4, 4, 4).sum(1) == 3).all()
    m0 = np.asarray(P.NM(2, 4).mask(scores, 0.0))
    assert m0.all()
    m_over = np.asarray(P.NM(2, 4).mask(scores, 0.9))  # capped at n kept
    assert (m_over.reshape(4, 4, 4).sum(1) == 2).all()


@SETTINGS
@given(r=st.sampled_from([1, 2, 4]), c=st.sampled_from([1, 3]), br=st.sampled_from([1, 4]),
       bc=st.sampled_from([1, 3]), s=st.floats(0, 0.99), seed=st.integers(0, 100))
def test_block_exact_blocks(r, c, br, bc, s, seed):
    scores = jax.random.uniform(jax.random.key(seed), (r * br, c * bc))
    mask = np.asarray(P.Block(r, c).mask(scores, s))
    blocks = mask.reshape(br, r, bc, c)
    # each block is all-kept or all-pruned
    per_block = blocks.sum(axis=(1, 3))
    assert np.isin(per_block, [0, r * c]).all()
    n_pruned = int(np.round(np.float32(s) * br * bc))
    assert (per_block == 0).sum() == n_pruned
    bscore = np.asarray(scores).reshape(br, r, bc, c).sum(axis=(1, 3)).reshape(-1)
    np.testing.assert_array_equal((per_block > 0).reshape(-1), _np_topk(bscore, bscore.size
                                                                         - n_pruned))


def test_channel_prunes_whole_units():
    scores = jnp.array([[1.0, 5.0, 0.1], [1.0, 5.0, 0.2]])
    m = np.asarray(P.Channel().mask(scores, 1 / 3))
    np.testing.assert_array_equal(m, [[True, True, False]] * 2)
    conv = jax.random.uniform(jax.random.key(0), (3, 3, 4, 8))
    m = np.asarray(P.Channel().mask(conv, 0.5))
    per_unit = m.reshape(-1, 8).all(axis=0) | ~m.reshape(-1, 8).any(axis=0)
    assert per_unit.all() and (~m.reshape(-1, 8).any(axis=0)).sum() == 4


def test_patterns_hashable_and_static_under_jit():
    for p in (P.Unstructured(), P.NM(2, 4), P.Block(2, 2), P.Channel(),
              P.PerLeaf((("a", P.NM(1, 2)),))):
        hash(p)
    f = jax.jit(lambda s, sp, pat: pat.mask(s, sp), static_argnums=2)
    x = jnp.arange(16.0).reshape(8, 2)
    np.testing.assert_array_equal(f(x, 0.5, P.NM(2, 4)), P.NM(2, 4).mask(x, 0.5))


def test_parse_and_errors():
    assert P.parse("4:8") == P.NM(4, 8)
    assert P.parse("block:2x8") == P.Block(2, 8)
    with pytest.raises(ValueError, match="unknown pattern 'diagonal'"):
        P.parse("diagonal")
    with pytest.raises(ValueError, match="'enc/kernel'.*axis 0 has length 6.*m=4"):
        P.NM(2, 4).validate("enc/kernel", (6, 3))
    with pytest.raises(ValueError, match=r"block \(4, 4\) does not divide 'x/kernel'"):
        P.Block(4, 4).validate("x/kernel", (8, 6))
    with pytest.raises(ValueError, match="0 < n <= m"):
        P.NM(5, 4)
