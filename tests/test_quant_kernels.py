"""Packed N:M + int4/int8 weights: lossless packing, numpy oracle, and the Pallas kernel (interpret)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.kernels import quant_formats as QF
from jaxprune.kernels.nm_quant_matmul import bench_quant_kernel, nm_quant_matmul, nm_quant_matmul_ref


def _nm_mask(rng, k, n_cols, n, m, sparse_groups=True):
    keep = np.argsort(rng.random((k // m, m, n_cols)), axis=1) < n
    if sparse_groups:  # some groups keep fewer than n (all the way down to none)
        drop = rng.random((k // m, m, n_cols)) < 0.2
        keep &= ~drop
    return keep.reshape(k, n_cols)


def _case(seed, k, n_cols, bits, sym, group, n=2, m=4):
    rng = np.random.default_rng(seed)
    mask = _nm_mask(rng, k, n_cols, n, m)
    if sym:
        codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(k, n_cols))
        zeros = None
        codes = np.where(mask, codes, 0).astype(np.int8)
    else:
        zeros = rng.integers(0, 2**bits, size=(k // group, n_cols)).astype(np.uint8)
        codes = rng.integers(0, 2**bits, size=(k, n_cols))
        codes = np.where(mask, codes, np.repeat(zeros, group, 0)).astype(np.uint8)
    scales = rng.uniform(0.5, 2.0, size=(k // group, n_cols)).astype(np.float32)
    return codes, mask, scales, zeros


def _oracle(codes, mask, scales, zeros, group):
    z = 0 if zeros is None else np.repeat(zeros.astype(np.float64), group, 0)
    return np.where(mask, np.repeat(scales.astype(np.float64), group, 0) * (codes - z), 0.0)


@pytest.mark.parametrize("bits,sym,group,n,m", [
    (4, True, 16, 2, 4), (8, False, 16, 2, 4), (3, True, 64, 1, 4), (4, False, 32, 3, 8)])
def test_pack_unpack_lossless_and_dequantize_oracle(bits, sym, group, n, m):
    k = 64
    codes, mask, scales, zeros = _case(bits * 10 + n, k, 6, bits, sym, group, n, m)
    p = QF.pack_nm_quant(codes, mask, scales, zeros, bits=bits, group_size=group, n=n, m=m)
    assert p.codes.dtype == (np.uint8 if bits <= 4 or not sym else np.int8)
    assert p.codes.shape[0] == ((n + 1) // 2 if bits <= 4 else n)
    c2, m2, s2, z2 = QF.unpack_nm_quant(p)
    ambiguous = n == 1 and m == 4  # 1:4 empty group decodes as one kept zero (formats.NMPacked)
    if not ambiguous:
        np.testing.assert_array_equal(np.asarray(m2), mask)
    np.testing.assert_array_equal(np.asarray(c2), codes)
    np.testing.assert_array_equal(np.asarray(s2), scales)
    assert (z2 is None) == sym and (sym or np.array_equal(np.asarray(z2), zeros))
    np.testing.assert_allclose(np.asarray(QF.dequantize(p)), _oracle(codes, mask, scales, zeros, group),
                               rtol=1e-6, atol=1e-6)
    dense_bytes = k * 6 * 4
    assert p.nbytes() < dense_bytes / 4


def test_sweep_codes_pack_exactly():
    """SparseGPT(quant=...) 2:4 + int4 -> compress -> pack: the packed weight is the sweep's output."""
    from jaxprune.oneshot import QuantSpec, SparseGPT
    from jaxprune.oneshot.calibration import LayerStats

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32)).astype(np.float32)
    st = LayerStats.from_inputs(x)
    w = rng.normal(size=(32, 6)).astype(np.float32)  # the shapes/config of test_gptq: one compile
    meth = SparseGPT(blocksize=16, quant=QuantSpec(4, 16, symmetric=False))
    wq, mask = meth(w, st, pattern="2:4")
    qw, m2 = meth.compress(w, st, pattern="2:4")
    p = QF.pack_nm_quant(qw.codes, m2, qw.scales, qw.zeros, bits=4, group_size=16)
    np.testing.assert_array_equal(np.asarray(QF.dequantize(p)), np.asarray(wq))
    np.testing.assert_array_equal(np.asarray(m2), np.asarray(mask))


@pytest.mark.parametrize("bits,sym,group,dtype,tiles", [
    (4, True, 16, jnp.float32, (16, 16, 2)),    # 2 packed rows per step, 1 group per step
    (8, False, 16, jnp.bfloat16, (16, 32, 4)),  # asymmetric int8, 4 groups per step
])
def test_kernel_matches_reference_interpret(bits, sym, group, dtype, tiles):
    k, n_cols = 64, 32
    codes, mask, scales, zeros = _case(7, k, n_cols, bits, sym, group)
    p = QF.pack_nm_quant(codes, mask, scales * 0.05, zeros, bits=bits, group_size=group)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, k)), dtype)
    y = jax.jit(lambda x, p: nm_quant_matmul(x, p, impl="pallas", interpret=True, tiles=tiles))(x, p)
    y_ref = nm_quant_matmul_ref(x.reshape(-1, k), p).reshape(2, 3, n_cols)
    assert y.shape == (2, 3, n_cols) and y.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               rtol=tol, atol=tol)
    oracle = np.asarray(x, np.float64).reshape(-1, k) @ _oracle(codes, mask, scales * 0.05, zeros, group)
    np.testing.assert_allclose(np.asarray(y_ref, np.float64).reshape(-1, n_cols), oracle,
                               rtol=tol, atol=tol * 4)


def test_errors_and_bench_hook():
    codes, mask, scales, _ = _case(0, 32, 4, 4, True, 16)
    with pytest.raises(ValueError, match="group_size=8 must divide K=32 and be a multiple of 16"):
        QF.pack_nm_quant(codes, mask, scales, None, bits=4, group_size=8)
    with pytest.raises(ValueError, match=r"outside the 4-bit range \[-8, 7\]"):
        QF.pack_nm_quant(np.where(mask, 9, 0).astype(np.int8), mask, scales, None, bits=4,
                         group_size=16)
    with pytest.raises(ValueError, match="not 2:4 valid"):
        QF.pack_nm_quant(codes, np.ones_like(mask), scales, None, bits=4, group_size=16)
    with pytest.raises(TypeError, match="integers"):
        QF.pack_nm_quant(codes.astype(np.float32), mask, scales, None, bits=4, group_size=16)
    p = QF.pack_nm_quant(codes, mask, scales, None, bits=4, group_size=16)
    with pytest.raises(ValueError, match="x must be"):
        nm_quant_matmul(jnp.ones((2, 31)), p)
    r = bench_quant_kernel(m=2, k=64, n=32, group_size=32, dtype=jnp.float32, iters=1)
    assert r["max_abs_err"] < 1e-3 and r["packed_bytes"] < r["dense_bytes"] / 4
    assert {"kernel_ms", "dense_ms", "reference_ms", "backend"} <= set(r)
