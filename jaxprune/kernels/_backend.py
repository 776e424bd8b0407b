"""Backend dispatch shared by the kernels: interpret on CPU, compile on GPU/TPU, fall back safely.

``resolve(impl, variant, interpret)`` picks what runs:

* ``impl="reference"`` — the ``jnp`` oracle (XLA).
* ``impl="pallas"`` — the Pallas kernel; on CPU with ``interpret=True`` (always under ``jit``).
* ``impl="auto"`` (default) — Pallas; on GPU/TPU the kernel for the given static configuration is
  first compiled once on its own (``jax.jit(...).lower(...).compile()``, cached); if that fails
  (unsupported dtype, tile shape, lowering gap on this jax version) a warning is emitted and the
  reference runs instead. This check works even when the caller is itself being traced by ``jit``.

``variant`` picks the kernel's structure: ``"tpu"`` (grid over the reduction, scalar-prefetched block
indices via ``PrefetchScalarGridSpec``) or ``"gpu"`` (Triton-style: one program per output tile,
reduction loop inside the kernel). Default: ``"gpu"`` on GPU, ``"tpu"`` elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax

_IMPLS = ("auto", "pallas", "reference")
_VARIANTS = ("auto", "tpu", "gpu")
_COMPILE_OK: dict[Any, bool] = {}


def platform() -> str:
    """``'cpu'``, ``'gpu'`` or ``'tpu'`` (the default backend)."""
    p = jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def resolve(impl: str, variant: str, interpret: bool | None) -> tuple[str, str, bool]:
    """Validate and resolve ``(impl, variant, interpret)``.

    >>> resolve("auto", "auto", None)[0] in ("auto", "pallas")
    True
    """
    if impl not in _IMPLS:
        raise ValueError(f"jaxprune.kernels: impl must be one of {_IMPLS}, got {impl!r}")
    if variant not in _VARIANTS:
        raise ValueError(f"jaxprune.kernels: variant must be one of {_VARIANTS}, got {variant!r}")
    plat = platform()
    if variant == "auto":
        variant = "gpu" if plat == "gpu" else "tpu"
    if interpret is None:
        interpret = plat not in ("gpu", "tpu")
    if impl == "auto" and interpret:
        impl = "pallas"  # interpret mode runs anywhere; no compile check needed
    return impl, variant, bool(interpret)


def compiles(key: Any, fn: Callable[..., Any], *abstract: Any) -> bool:
    """Whether ``jax.jit(fn)`` compiles for ``abstract`` args (cached by ``key``); warns if not."""
    if key in _COMPILE_OK:
        return _COMPILE_OK[key]
    try:
        jax.jit(fn).lower(*abstract).compile()
        ok = True
    except Exception as e:  # noqa: BLE001 - any lowering/compile failure means: fall back
        warnings.warn(
            f"jaxprune.kernels: Pallas kernel {key[0]} does not compile on {platform()} for "
            f"{key[1:]} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "falling back to the jnp reference",
            RuntimeWarning,
            stacklevel=3,
        )
        ok = False
    _COMPILE_OK[key] = ok
    return ok


def abstract(*xs: Any) -> list[jax.ShapeDtypeStruct]:
    """``ShapeDtypeStruct`` of each array (works on tracers)."""
    return [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]


def triton_params() -> Any:
    """Triton compiler params when available (selects the Triton lowering on GPU), else ``None``."""
    try:
        from jax.experimental.pallas import triton as plt

        return plt.CompilerParams(num_warps=4, num_stages=2)
    except Exception:  # noqa: BLE001
        return None
