"""Packed formats: lossless pack/unpack (hypothesis), pytree behaviour, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.core import patterns
from jaxprune.kernels import formats as F

SETTINGS = settings(max_examples=20, deadline=None)
NM_PAIRS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 3), (2, 8)]


@jax.jit
def _decode(p):
    """unpack + to_mask in one compiled call (one compile per shape, not one per op)."""
    return F.unpack(p), F.to_mask(p)


def _nm_mask(rng, k, n_cols, n, m, full):
    """Random N:M-valid mask (groups along axis 0); ``full`` = exactly n kept per group."""
    g = k // m
    mask = np.zeros((g, m, n_cols), bool)
    for gi in range(g):
        for c in range(n_cols):
            cnt = n if full else rng.integers(0, n + 1)
            mask[gi, rng.choice(m, size=cnt, replace=False), c] = True
    return mask.reshape(k, n_cols)


@SETTINGS
@given(pair=st.sampled_from(NM_PAIRS), groups=st.sampled_from([1, 5]), cols=st.sampled_from([3]),
       lead=st.sampled_from([(), (2,)]), full=st.booleans(), seed=st.integers(0, 2**16),
       bf16=st.booleans())
def test_nm_roundtrip(pair, groups, cols, lead, full, seed, bf16):
    n, m = pair
    rng = np.random.default_rng(seed)
    k_in = groups * m
    shape = (*lead, k_in, cols)
    k = int(np.prod(shape[:-1]))
    mask = _nm_mask(rng, k, cols, n, m, full).reshape(shape)
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    w = jnp.asarray(rng.standard_normal(shape), dtype)
    p = F.pack_nm(w, mask, n, m)
    assert p.indices.dtype == jnp.uint8
    assert p.values.dtype == dtype
    dense, got = _decode(p)
    assert dense.shape == shape and dense.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(jnp.where(mask, w, 0)))
    got = np.asarray(got)
    groups_kept = mask.reshape(k // m, m, cols).sum(1)
    lossy = n == 1 and m == 2 ** F.code_bits(m) and (groups_kept == 0).any()
    if lossy:  # documented: an empty group of 1:2^b decodes as one kept zero
        assert (got | ~mask).all()
    else:
        np.testing.assert_array_equal(got, mask)


def test_nm_2to4_bit_layout():
    """2:4 stores 2-bit codes, 4 per byte; 2 kept values per group of 4 along K."""
    w = jnp.arange(1.0, 17.0).reshape(16, 1)
    mask = np.zeros((16, 1), bool)
    mask[[1, 3, 4, 6, 8, 9, 14, 15], 0] = True
    p = F.pack_nm(w, mask, 2, 4)
    assert p.values.shape == (2, 4, 1, 1) and p.indices.shape == (2, 1, 1)
    # slot 0 codes of groups 0..3: 1, 0, 0, 2 ; slot 1: 3, 2, 1, 3
    assert int(p.indices[0, 0, 0]) == 1 | (0 << 2) | (0 << 4) | (2 << 6)
    assert int(p.indices[1, 0, 0]) == 3 | (2 << 2) | (1 << 4) | (3 << 6)
    assert p.nbytes() == 8 * 4 + 2


def test_nm_from_pattern_mask_and_pytree():
    w = jax.random.normal(jax.random.key(0), (3, 3, 8, 6))  # conv kernel (h, w, in, out)
    mask = patterns.NM(2, 4).mask(jnp.abs(w), 0.5)
    p = F.pack_nm(w, mask, 2, 4)
    leaves = jax.tree.leaves(p)
    assert len(leaves) == 2
    dense = jax.jit(F.unpack)(p)
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(jnp.where(mask, w, 0)))
    p2 = jax.tree.map(lambda x: x, p)
    assert p2.shape == p.shape and (p2.n, p2.m) == (2, 4)


@pytest.mark.parametrize("n,m,word", [(2, 256, np.uint8), (1, 256, np.uint8), (2, 300, np.uint16),
                                      (1, 512, np.uint16)])
def test_nm_large_m_roundtrip(n, m, word):
    """m >= 256: 8-bit codes up to 256 (no spare empty code), one uint16 code each above."""
    rng = np.random.default_rng(m + n)
    mask = _nm_mask(rng, 2 * m, 3, n, m, full=False)
    mask[m - n:m, 0] = True  # the last positions of a group are used (uint8 wrapped at 256)
    mask[:m - n, 0] = False
    mask[m:, 1] = False  # an empty group
    w = jnp.asarray(rng.standard_normal(mask.shape), jnp.float32)
    p = F.pack_nm(w, mask, n, m)
    assert p.indices.dtype == word and p.per_word == F.codes_per_word(m) == 1
    assert p.nbytes() == p.values.size * 4 + p.indices.size * np.dtype(word).itemsize
    dense, got = _decode(p)
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(jnp.where(mask, w, 0)))
    if n == 1 and m == 256:  # documented lossy case: the empty group decodes as one kept zero
        assert (np.asarray(got) | ~mask).all() and not np.array_equal(np.asarray(got), mask)
    else:
        np.testing.assert_array_equal(np.asarray(got), mask)


def test_code_bits_limits():
    assert [F.code_bits(m) for m in (2, 4, 16, 256, 257, 65536)] == [1, 2, 4, 8, 16, 16]
    with pytest.raises(ValueError, match="m <= 65536"):
        F.code_bits(65537)


@SETTINGS
@given(kb=st.sampled_from([1, 3]), nb=st.sampled_from([2, 4]), br=st.sampled_from([1, 4]),
       bc=st.sampled_from([3]), density=st.floats(0.0, 1.0), partial=st.booleans(),
       extra=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_block_roundtrip(kb, nb, br, bc, density, partial, extra, seed):
    rng = np.random.default_rng(seed)
    present = rng.random((kb, nb)) < density
    mask = np.repeat(np.repeat(present, br, 0), bc, 1)
    if partial:
        mask = mask & (rng.random(mask.shape) < 0.7)
    w = rng.standard_normal(mask.shape).astype(np.float32)
    nnz = int(mask.reshape(kb, br, nb, bc).any(axis=(1, 3)).sum())
    b = F.pack_block(w, mask, (br, bc), nnz_max=nnz + extra)
    assert b.nnz_max == nnz + extra and int(b.col_ptr[-1]) == nnz
    dense, got = _decode(b)
    np.testing.assert_array_equal(np.asarray(dense), np.where(mask, w, 0))
    cover = np.repeat(np.repeat(mask.reshape(kb, br, nb, bc).any(axis=(1, 3)), br, 0), bc, 1)
    np.testing.assert_array_equal(np.asarray(got), cover)
    if not partial:
        np.testing.assert_array_equal(np.asarray(got), mask)
    counts = np.diff(np.asarray(b.col_ptr))
    assert b.max_per_col == (int(counts.max()) if nb else 0)
    # blocks are sorted by column, then row
    keys = list(zip(np.asarray(b.cols)[:nnz], np.asarray(b.rows)[:nnz], strict=True))
    assert keys == sorted(keys)


def test_block_from_pattern():
    w = jax.random.normal(jax.random.key(1), (16, 8))
    mask = patterns.Block(4, 2).mask(jnp.abs(w), 0.75)
    b = F.pack_block(w, mask, (4, 2))
    assert b.nnz_max == 4  # 16 blocks, 75% pruned
    np.testing.assert_array_equal(np.asarray(F.to_mask(b)), np.asarray(mask))
    np.testing.assert_array_equal(np.asarray(jax.jit(F.unpack)(b)),
                                  np.asarray(jnp.where(mask, w, 0)))


@SETTINGS
@given(shape=st.sampled_from([(7,), (2, 3, 4)]),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), extra=st.integers(0, 2))
def test_bitmask_roundtrip(shape, density, seed, extra):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    w = rng.standard_normal(shape).astype(np.float32)
    b = F.pack_bitmask(w, mask, nnz_max=int(mask.sum()) + extra)
    np.testing.assert_array_equal(np.asarray(b.bits), np.packbits(mask.ravel()))
    dense, got = _decode(b)
    np.testing.assert_array_equal(np.asarray(dense), np.where(mask, w, 0))
    np.testing.assert_array_equal(np.asarray(got), mask)


def test_kept_zero_values_survive():
    """A kept entry whose value is 0 is still kept in the mask (formats are mask-exact)."""
    w = jnp.zeros((4, 2))
    mask = jnp.array([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
    for p in (F.pack_nm(w, mask, 2, 4), F.pack_bitmask(w, mask)):
        np.testing.assert_array_equal(np.asarray(F.to_mask(p)), np.asarray(mask))


# ------------------------------------------------------------------------------------------ errors


def test_nm_invalid_mask_names_first_group():
    mask = np.zeros((12, 4), bool)
    mask[0:2, :] = True  # fine: 2 per group
    mask[4:7, 2] = True  # group rows 4..7, column 2: 3 kept
    mask[8:12, 3] = True
    with pytest.raises(ValueError, match=r"rows 4\.\.7, column 2 \(3 kept > n=2\)"):
        F.pack_nm(np.ones((12, 4), np.float32), mask, 2, 4)


def test_nm_bad_shapes():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        F.pack_nm(np.ones((6, 2), np.float32), np.zeros((6, 2), bool), 2, 4)
    with pytest.raises(ValueError, match="does not match weight shape"):
        F.pack_nm(np.ones((8, 2), np.float32), np.zeros((8, 3), bool), 2, 4)
    with pytest.raises(ValueError, match=">= 2 dims"):
        F.pack_nm(np.ones(8, np.float32), np.zeros(8, bool), 2, 4)
    with pytest.raises(ValueError, match="0 < n <= m"):
        F.pack_nm(np.ones((8, 2), np.float32), np.zeros((8, 2), bool), 5, 4)
    with pytest.raises(TypeError, match="floating point"):
        F.pack_nm(np.ones((8, 2), np.int32), np.zeros((8, 2), bool), 2, 4)


def test_block_bad_shapes():
    with pytest.raises(ValueError, match=r"block \(3, 2\) does not divide"):
        F.pack_block(np.ones((8, 4), np.float32), np.ones((8, 4), bool), (3, 2))
    with pytest.raises(ValueError, match="nnz_max=1 < 2"):
        F.pack_block(np.ones((4, 4), np.float32), np.eye(4, dtype=bool), (2, 2), nnz_max=1)
    with pytest.raises(ValueError, match="nnz_max=0 < 1"):
        F.pack_bitmask(np.ones(3, np.float32), np.array([1, 0, 0], bool), nnz_max=0)


def test_pack_under_jit_is_a_clear_error():
    with pytest.raises(TypeError, match="must be concrete"):
        jax.jit(lambda w, m: F.pack_nm(w, m, 2, 4).values)(jnp.ones((4, 2)), jnp.ones((4, 2), bool))


def test_unpack_rejects_non_packed():
    with pytest.raises(TypeError, match="expected a packed format"):
        F.unpack(jnp.ones(3))
