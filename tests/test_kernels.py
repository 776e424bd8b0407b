"""Pallas N:M and block-sparse matmul (interpret mode under jit on CPU) vs the jnp reference."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.core import patterns
from jaxprune.kernels import _backend
from jaxprune.kernels import formats as F
from jaxprune.kernels import reference as ref
from jaxprune.kernels.block_sparse_matmul import block_sparse_matmul
from jaxprune.kernels.nm_matmul import nm_matmul

RNG = np.random.default_rng(1234)


def _nm_case(n, m, k, ncols, seed):
    r = np.random.default_rng(seed)
    w = r.standard_normal((k, ncols)).astype(np.float32)
    mask = patterns.NM(n, m).mask(jnp.asarray(r.standard_normal((k, ncols))), 1 - n / m)
    # thin some groups below n (under-full groups are legal N:M masks)
    mask = np.asarray(mask) & (r.random((k, ncols)) < 0.85)
    return w, mask


def _block_case(k, ncols, block, sparsity, seed):
    r = np.random.default_rng(seed)
    w = r.standard_normal((k, ncols)).astype(np.float32)
    mask = patterns.Block(*block).mask(jnp.asarray(r.standard_normal((k, ncols))), sparsity)
    return w, np.asarray(mask)


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)


# random shapes (seeded), each with a ragged M (not a multiple of the row tile)
NM_CASES = [
    # n, m, K, N, M, variant, tiles, dtype
    (2, 4, 64, 32, 5, "tpu", (8, 16, 2), jnp.float32),  # 3-D grid: 1 x 2 x 2 tiles
    (2, 4, 64, 32, 5, "gpu", (16, 16, 2), jnp.float32),  # in-kernel K loop, 2 steps
    (1, 4, 40, 8, 1, "tpu", None, jnp.float32),  # K padded 40 -> 48 (groups % 4)
    (2, 8, 48, 16, int(RNG.integers(17, 31)), "gpu", None, jnp.float32),  # 4-bit codes
    (2, 4, 32, 16, int(RNG.integers(2, 15)), "tpu", None, jnp.bfloat16),
]


@pytest.mark.parametrize("n,m,k,ncols,mrows,variant,tiles,dtype", NM_CASES)
def test_nm_matmul_matches_reference(n, m, k, ncols, mrows, variant, tiles, dtype):
    w, mask = _nm_case(n, m, k, ncols, seed=k * ncols + mrows)
    p = F.pack_nm(jnp.asarray(w, dtype), mask, n, m)
    x = jnp.asarray(RNG.standard_normal((mrows, k)), dtype)
    f = jax.jit(functools.partial(nm_matmul, variant=variant, tiles=tiles, impl="pallas"))
    y = f(x, p)
    assert y.shape == (mrows, ncols) and y.dtype == dtype
    y_ref = ref.nm_matmul_ref(x, p)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                               **_tol(dtype))
    dense = jnp.where(mask, jnp.asarray(w, dtype), 0)
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(x.astype(jnp.float32) @ dense.astype(jnp.float32)),
                               **_tol(dtype))


def test_nm_reference_and_grads_for_16bit_codes():
    """m > 256 (uint16 codes): the reference op and its custom_vjp against dense jnp.

    The Pallas kernels unroll m planes per group, so m > 256 is a storage format (compact
    checkpoints) rather than a kernel target; its kernel path is not compiled here.
    """
    w, mask = _nm_case(3, 300, 600, 4, seed=7)
    p = F.pack_nm(w, mask, 3, 300)
    assert p.indices.dtype == jnp.uint16
    x = jnp.asarray(RNG.standard_normal((2, 600)), jnp.float32)
    dense = jnp.where(mask, w, 0)
    np.testing.assert_allclose(np.asarray(nm_matmul(x, p, impl="reference")),
                               np.asarray(x @ dense), rtol=1e-5, atol=1e-5)
    gv = jax.grad(lambda v: nm_matmul(x, p.replace(values=v), impl="reference").sum())(p.values)
    gd = jax.grad(lambda d: (x @ d).sum())(dense)
    np.testing.assert_allclose(np.asarray(F.unpack(p.replace(values=gv))),
                               np.where(mask, np.asarray(gd), 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_nm_matmul_grads_match_reference(variant):
    w, mask = _nm_case(2, 4, 64, 16, seed=7)
    p = F.pack_nm(w, mask, 2, 4)
    x = jnp.asarray(RNG.standard_normal((2, 3, 64)), jnp.float32)  # leading batch dims

    def loss(fn, x, v):
        return jnp.sum(jnp.sin(fn(x, p.replace(values=v))))

    kern = functools.partial(nm_matmul, variant=variant, tiles=(16, 16, 2))
    g = jax.jit(jax.grad(functools.partial(loss, kern), argnums=(0, 1)))(x, p.values)
    g_ref = jax.grad(functools.partial(loss, ref.nm_matmul_ref), argnums=(0, 1))(x, p.values)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


BS_CASES = [
    # K, N, M, block, sparsity, nnz_extra, variant, dtype
    (32, 24, 5, (8, 8), 0.5, 2, "tpu", jnp.float32),
    (32, 24, int(RNG.integers(17, 40)), (8, 4), 0.75, 0, "gpu", jnp.float32),
    (16, 32, 3, (4, 8), 0.9, 1, "tpu", jnp.float32),
    (32, 16, 7, (8, 8), 0.5, 0, "tpu", jnp.bfloat16),
]


@pytest.mark.parametrize("k,ncols,mrows,block,sparsity,extra,variant,dtype", BS_CASES)
def test_block_sparse_matmul_matches_reference(k, ncols, mrows, block, sparsity, extra, variant,
                                               dtype):
    w, mask = _block_case(k, ncols, block, sparsity, seed=k + ncols + mrows)
    nnz = int(mask.reshape(k // block[0], block[0], ncols // block[1], block[1])
              .any(axis=(1, 3)).sum())
    b = F.pack_block(jnp.asarray(w, dtype), mask, block, nnz_max=nnz + extra)
    x = jnp.asarray(RNG.standard_normal((mrows, k)), dtype)
    f = jax.jit(functools.partial(block_sparse_matmul, variant=variant, impl="pallas"))
    y = f(x, b)
    assert y.shape == (mrows, ncols) and y.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(ref.block_sparse_matmul_ref(x, b), np.float32),
                               **_tol(dtype))


def test_block_sparse_all_zero_weight():
    b = F.pack_block(np.ones((8, 8), np.float32), np.zeros((8, 8), bool), (4, 4))
    y = jax.jit(block_sparse_matmul)(jnp.ones((3, 8)), b)
    np.testing.assert_array_equal(np.asarray(y), np.zeros((3, 8)))


@pytest.mark.parametrize("variant", ["tpu", "gpu"])
def test_block_sparse_grads_match_reference(variant):
    w, mask = _block_case(16, 16, (4, 4), 0.5, seed=3)
    b = F.pack_block(w, mask, (4, 4), nnz_max=10)  # 8 stored + 2 padding blocks
    x = jnp.asarray(RNG.standard_normal((5, 16)), jnp.float32)

    def loss(fn, x, blocks):
        return jnp.sum(jnp.sin(fn(x, b.replace(blocks=blocks))))

    kern = functools.partial(block_sparse_matmul, variant=variant)
    g = jax.jit(jax.grad(functools.partial(loss, kern), argnums=(0, 1)))(x, b.blocks)
    g_ref = jax.grad(functools.partial(loss, ref.block_sparse_matmul_ref), argnums=(0, 1))(
        x, b.blocks)
    for a, c in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-4)
    assert not np.asarray(g[1][8:]).any()  # padding blocks get no gradient


def test_reference_impl_and_bad_inputs():
    w, mask = _nm_case(2, 4, 16, 8, seed=0)
    p = F.pack_nm(w, mask)
    x = jnp.ones((2, 16))
    np.testing.assert_allclose(np.asarray(nm_matmul(x, p, impl="reference")),
                               np.asarray(x @ jnp.where(mask, w, 0)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"contraction dimension K is 16"):
        nm_matmul(jnp.ones((2, 12)), p)
    with pytest.raises(TypeError, match="must be NMPacked"):
        nm_matmul(x, jnp.ones((16, 8)))
    with pytest.raises(ValueError, match="impl must be one of"):
        nm_matmul(x, p, impl="cuda")
    with pytest.raises(ValueError, match="variant must be one of"):
        nm_matmul(x, p, variant="cpu")
    with pytest.raises(ValueError, match="tiles .* must divide"):
        nm_matmul(x, p, tiles=(16, 3, 1), impl="pallas")
    with pytest.raises(TypeError, match="floating point"):
        nm_matmul(jnp.ones((2, 16), jnp.int32), p)
    b = F.pack_block(w, np.ones_like(mask), (4, 4))
    with pytest.raises(TypeError, match="must be BlockSparse"):
        block_sparse_matmul(x, p)
    with pytest.raises(ValueError, match="contraction dimension K is 16"):
        block_sparse_matmul(jnp.ones((2, 8)), b)


def test_compile_failure_raises_unless_fallback_is_asked_for(monkeypatch):
    """A kernel that cannot compile (here: Pallas without interpret on CPU) raises a
    KernelCompileError naming the way out; the reference runs only with ``fallback=True`` or
    ``$JAXPRUNE_KERNEL_FALLBACK=1`` (and then with a warning), never silently."""
    w, mask = _nm_case(2, 4, 16, 8, seed=1)
    p = F.pack_nm(w, mask)
    b = F.pack_block(w, np.ones_like(mask), (4, 4))
    x = jnp.ones((3, 16))
    monkeypatch.delenv(_backend.FALLBACK_ENV, raising=False)
    _backend._COMPILE_OK.clear()
    for _ in range(2):  # the second call hits the cache and still raises
        with pytest.raises(_backend.KernelCompileError, match="fallback=True .*JAXPRUNE_KERNEL_FALLBACK"):
            jax.jit(functools.partial(nm_matmul, interpret=False))(x, p)
    with pytest.raises(_backend.KernelCompileError, match="block_sparse_matmul"):
        block_sparse_matmul(x, b, interpret=False, variant="gpu")
    with pytest.warns(RuntimeWarning, match="falling back to the jnp reference"):
        _backend._COMPILE_OK.clear()
        y = jax.jit(functools.partial(nm_matmul, interpret=False, fallback=True))(x, p)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref.nm_matmul_ref(x, p)), rtol=1e-5)
    with warnings.catch_warnings():  # cached: the second call does not re-try or re-warn
        warnings.simplefilter("error")
        jax.jit(functools.partial(nm_matmul, interpret=False, fallback=True))(x, p)
    monkeypatch.setenv(_backend.FALLBACK_ENV, "1")
    with pytest.warns(RuntimeWarning, match="falling back"):  # the env var allows it
        yb = block_sparse_matmul(x, b, interpret=False, variant="gpu")
    np.testing.assert_allclose(np.asarray(yb), np.asarray(x @ w), rtol=1e-5, atol=1e-5)
    with pytest.raises(_backend.KernelCompileError):  # the argument wins over the env var
        block_sparse_matmul(x, b, interpret=False, variant="gpu", fallback=False)
    monkeypatch.setenv(_backend.FALLBACK_ENV, "maybe")
    with pytest.raises(ValueError, match="JAXPRUNE_KERNEL_FALLBACK must be"):
        nm_matmul(x, p)
    _backend._COMPILE_OK.clear()


def test_default_interpret_mode_on_cpu_needs_no_fallback(monkeypatch):
    """On CPU the default runs the kernel in interpret mode: no compile check, no fallback."""
    monkeypatch.delenv(_backend.FALLBACK_ENV, raising=False)
    assert _backend.resolve("auto", "auto", None) == ("pallas", "tpu", True)
    w, mask = _nm_case(2, 4, 16, 8, seed=2)
    p = F.pack_nm(w, mask)
    x = jnp.ones((2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = jax.jit(nm_matmul)(x, p)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref.nm_matmul_ref(x, p)), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_variants_lower_to_triton_for_cuda(dtype):
    """Cross-lowering on CPU: the GPU variants produce a Pallas Triton custom call for CUDA
    (catches Triton lowering gaps before any GPU time; compiling Triton IR needs the GPU)."""
    w, mask = _nm_case(2, 4, 128, 64, seed=5)
    p = F.pack_nm(jnp.asarray(w, dtype), mask, 2, 4)
    b = F.pack_block(jnp.asarray(w, dtype), np.ones_like(mask), (32, 32))
    x = jnp.ones((3, 128), dtype)
    for fn, wt in ((nm_matmul, p), (block_sparse_matmul, b)):
        f = jax.jit(functools.partial(fn, impl="pallas", variant="gpu", interpret=False))
        text = _backend.lower_for_cuda(f, x, wt)
        assert "triton" in text


@pytest.mark.parametrize("impl", ["pallas", "reference"])
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batch_gives_an_empty_result_in_every_kernel(impl, lead):
    """One rule for all three kernels, kernel and reference alike: ``x`` of shape ``(..., K)`` with
    no rows gives ``(..., N)`` with no rows (the block kernel used to fail with an XLA slice error
    and the N:M kernel raised)."""
    from jaxprune.kernels import quant_formats as QF
    from jaxprune.kernels.nm_quant_matmul import nm_quant_matmul

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    m24 = jnp.asarray(np.tile(np.array([True, False, True, False]), 8)[:, None].repeat(8, 1))
    codes = np.where(np.asarray(m24), rng.integers(-7, 8, size=(32, 8)), 0).astype(np.int8)
    cases = {
        "nm": (nm_matmul, F.pack_nm(w, m24, 2, 4)),
        "block": (block_sparse_matmul, F.pack_block(w, jnp.ones((32, 8), bool), (8, 8))),
        "nm_quant": (nm_quant_matmul, QF.pack_nm_quant(codes, m24, np.ones((1, 8), np.float32),
                                                      None, bits=4, group_size=32)),
    }
    x = jnp.ones((*lead, 32), jnp.float32)
    for name, (fn, packed) in cases.items():
        y = jax.jit(lambda a, p, fn=fn: fn(a, p, impl=impl))(x, packed)
        assert y.shape == (*lead, 8) and y.dtype == jnp.float32, (name, y.shape, y.dtype)
