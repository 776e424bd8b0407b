"""Backend dispatch shared by the kernels: interpret on CPU, compile on GPU/TPU, never fall back silently.

``resolve(impl, variant, interpret)`` picks what runs:

* ``impl="reference"`` — the ``jnp`` oracle (XLA).
* ``impl="pallas"`` — the Pallas kernel; on CPU with ``interpret=True`` (always under ``jit``).
* ``impl="auto"`` (default) — Pallas; on GPU/TPU the kernel for the given static configuration is
  first compiled once on its own (``jax.jit(...).lower(...).compile()``, cached). If that fails
  (unsupported dtype, tile shape, lowering gap on this jax version) a :class:`KernelCompileError`
  is raised — a benchmark or a model that silently ran the dense reference would report wrong
  numbers. The reference runs instead (with a ``RuntimeWarning``) only when asked for: the kernels'
  ``fallback=True`` argument, or the environment variable ``JAXPRUNE_KERNEL_FALLBACK=1``. This check
  works even when the caller is itself being traced by ``jit``.

``variant`` picks the kernel's structure: ``"tpu"`` (grid over the reduction, scalar-prefetched block
indices via ``PrefetchScalarGridSpec``) or ``"gpu"`` (Triton-style: one program per output tile,
reduction loop inside the kernel). Default: ``"gpu"`` on GPU, ``"tpu"`` elsewhere.
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax

_IMPLS = ("auto", "pallas", "reference")
_VARIANTS = ("auto", "tpu", "gpu")
#: environment variable that allows the reference fallback when ``fallback=None`` (``1``/``true``/``yes``)
FALLBACK_ENV = "JAXPRUNE_KERNEL_FALLBACK"
_COMPILE_OK: dict[Any, bool | str] = {}  # key -> True, or the first line of the compile error


class KernelCompileError(RuntimeError):
    """A Pallas kernel does not compile for this backend/configuration and no fallback was asked for."""


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


def positive_ints(xs: Any, count: int, what: str) -> tuple[int, ...]:
    """``xs`` as a tuple of ``count`` Python ints >= 1 (NumPy ints accepted), else a ``ValueError``
    naming ``what`` (``2.5`` or ``True`` are refused, not truncated).

    >>> positive_ints((16, 128), 2, "tiles")
    (16, 128)
    """
    shown = xs[0] if count == 1 and isinstance(xs, tuple) and len(xs) == 1 else xs
    bad = ValueError(f"jaxprune.kernels.{what} must be "
                     f"{'an integer' if count == 1 else f'{count} integers'} >= 1, got {shown!r}")
    try:
        out = tuple(operator.index(x) for x in xs)
    except TypeError:
        raise bad from None
    if len(out) != count or any(isinstance(x, bool) or x < 1 for x in xs):
        raise bad
    return out


def fallback_allowed(fallback: bool | None) -> bool:
    """Whether a kernel that does not compile may run the ``jnp`` reference instead.

    ``fallback`` wins when given; ``None`` reads ``$JAXPRUNE_KERNEL_FALLBACK`` (default: no).

    >>> fallback_allowed(True), fallback_allowed(False)
    (True, False)
    """
    if fallback is not None:
        return bool(fallback)
    env = os.environ.get(FALLBACK_ENV, "").strip().lower()
    if env in ("", "0", "false", "no"):
        return False
    if env in ("1", "true", "yes"):
        return True
    raise ValueError(f"jaxprune.kernels: ${FALLBACK_ENV} must be 1/true/yes or 0/false/no, got {env!r}")


def compiles(key: Any, fn: Callable[..., Any], *abstract: Any, fallback: bool = False) -> bool:
    """Whether ``jax.jit(fn)`` compiles for ``abstract`` args (cached by ``key``).

    On failure: raises :class:`KernelCompileError` unless ``fallback`` (then warns once and
    returns ``False``, so the caller runs the reference).

    >>> compiles(("doc", 1), lambda x: x + 1, jax.ShapeDtypeStruct((2,), "float32"))
    True
    """
    if key not in _COMPILE_OK:
        try:
            jax.jit(fn).lower(*abstract).compile()
            _COMPILE_OK[key] = True
        except Exception as e:  # noqa: BLE001 - any lowering/compile failure is reported below
            _COMPILE_OK[key] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            if fallback:
                warnings.warn(f"jaxprune.kernels: {_describe(key)} ({_COMPILE_OK[key]}); "
                              "falling back to the jnp reference", RuntimeWarning, stacklevel=3)
                return False
            raise KernelCompileError(_failure(key)) from e
    ok = _COMPILE_OK[key]
    if ok is True:
        return True
    if fallback:
        return False
    raise KernelCompileError(_failure(key))


def _describe(key: Any) -> str:
    return f"Pallas kernel {key[0]} does not compile on {platform()} (jax {jax.__version__}) for {key[1:]}"


def _failure(key: Any) -> str:
    return (f"jaxprune.kernels: {_describe(key)}: {_COMPILE_OK[key]}. Refusing to run the jnp "
            f"reference silently; pass fallback=True (or set {FALLBACK_ENV}=1) to allow it, "
            "impl='reference' to run it deliberately, or interpret=True to run the kernel in "
            "Pallas interpret mode")


def abstract(*xs: Any) -> list[jax.ShapeDtypeStruct]:
    """``ShapeDtypeStruct`` of each array (works on tracers)."""
    return [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs]


def triton_params() -> Any:
    """Triton compiler params for ``pallas_call`` on GPU.

    They select the Triton lowering explicitly: since jax 0.10 a ``pallas_call`` without them
    lowers to Mosaic GPU by default (``jax_pallas_use_mosaic_gpu``), which these Triton-style
    kernels are not written for. Raises ``RuntimeError`` when this jax has no Pallas Triton backend.

    >>> type(triton_params()).__name__
    'CompilerParams'
    """
    try:
        from jax.experimental.pallas import triton as plt
    except ImportError as e:
        raise RuntimeError(
            f"jaxprune.kernels: jax {jax.__version__} has no jax.experimental.pallas.triton; the GPU "
            "kernels need the Pallas Triton backend (use impl='reference' or interpret=True)"
        ) from e
    params = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams", None)
    if params is None:
        raise RuntimeError(f"jaxprune.kernels: jax {jax.__version__}: jax.experimental.pallas.triton "
                           "has no CompilerParams")
    return params(num_warps=4, num_stages=2)


def lower_for_cuda(fn: Callable[..., Any], *args: Any) -> str:
    """StableHLO text of ``fn`` (a ``jax.jit`` function) lowered for CUDA — on any host, no GPU needed.

    Runs the Pallas → Triton lowering of the ``"gpu"`` kernel variants (shape, dtype and primitive
    support), so lowering gaps show up on CPU; compiling the Triton IR itself needs a GPU.

    >>> import jax.numpy as jnp
    >>> "stablehlo" in lower_for_cuda(jax.jit(lambda x: x + 1), jnp.ones(2))
    True
    """
    from jax import export

    try:
        from jax.experimental.pallas import triton as plt

        target = getattr(plt, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
    except ImportError:
        target = "__gpu$xla.gpu.triton"
    checks = [export.DisabledSafetyCheck.custom_call(target)]
    return export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
