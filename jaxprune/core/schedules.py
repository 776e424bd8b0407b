"""Sparsity schedules: plain functions of the step, usable under ``jit``.

A schedule is a frozen dataclass with ``sparsity_at(step)`` (the sparsity at ``step``) and
``should_update(step)`` (whether masks are recomputed at ``step``). Both take a traced int and use
only ``jnp`` ops, so a schedule lives inside a jitted train step.

Example:
    >>> s = Polynomial(sparsity=0.9, begin=0, end=100, freq=10)
    >>> [round(float(s.sparsity_at(t)), 4) for t in (0, 50, 100)]
    [0.0, 0.7875, 0.9]
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.core.allocation import check_sparsity

__all__ = ["Schedule", "OneShot", "Polynomial", "Iterative"]


def _check_step(name: str, value: Any) -> None:
    """A step count must be a non-negative integer (``2.5`` or ``-1`` would never match a step)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        ok = jnp.issubdtype(value.dtype, jnp.integer)
    if not ok or int(value) < 0:
        raise ValueError(f"jaxprune: {name} must be an integer step >= 0, got {value!r}")


class Schedule:
    """Base class: ``sparsity_at(step) -> float32`` and ``should_update(step) -> bool``."""

    def sparsity_at(self, step: Any) -> jax.Array:
        raise NotImplementedError

    def should_update(self, step: Any) -> jax.Array:
        raise NotImplementedError

    def final_sparsity(self) -> float:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class OneShot(Schedule):
    """Prune to ``sparsity`` once, at ``step``.

    >>> s = OneShot(0.5, step=3)
    >>> float(s.sparsity_at(2)), float(s.sparsity_at(3)), bool(s.should_update(3))
    (0.0, 0.5, True)
    """

    sparsity: float
    step: int = 0

    def __post_init__(self) -> None:
        check_sparsity("OneShot.sparsity", self.sparsity)
        _check_step("OneShot.step", self.step)

    def sparsity_at(self, step):
        return jnp.where(jnp.asarray(step) >= self.step, self.sparsity, 0.0).astype(jnp.float32)

    def should_update(self, step):
        return jnp.asarray(step) == self.step

    def final_sparsity(self) -> float:
        return self.sparsity


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
    """Zhu & Gupta (2017) gradual pruning, mask updates every ``freq`` steps in ``[begin, end]``.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** power`` evaluated at the latest
    update step ``t <= step`` (so the sparsity is constant between updates).

    >>> s = Polynomial(0.8, begin=10, end=30, freq=10)
    >>> [bool(s.should_update(t)) for t in (9, 10, 15, 20, 30, 40)]
    [False, True, False, True, True, False]
    """

    sparsity: float
    begin: int
    end: int
    freq: int = 100
    initial: float = 0.0
    power: float = 3.0

    def __post_init__(self) -> None:
        check_sparsity("Polynomial.sparsity", self.sparsity)
        check_sparsity("Polynomial.initial", self.initial)
        _check_step("Polynomial.begin", self.begin)
        _check_step("Polynomial.end", self.end)
        _check_step("Polynomial.freq", self.freq)
        if self.freq <= 0:
            raise ValueError(f"jaxprune: Polynomial.freq must be > 0, got {self.freq}")
        if isinstance(self.power, bool) or not isinstance(self.power, int | float) \
                or not math.isfinite(self.power) or self.power <= 0:
            raise ValueError(
                f"jaxprune: Polynomial.power must be a finite number > 0 (3 = Zhu & Gupta), got "
                f"{self.power!r}; power <= 0 would prune everything at once or never"
            )
        if self.end <= self.begin:
            raise ValueError(
                f"jaxprune: Polynomial needs end > begin, got begin={self.begin}, end={self.end}"
            )

    def sparsity_at(self, step):
        t = jnp.asarray(step, jnp.float32)
        t = jnp.clip(t, self.begin, self.end)
        t = self.begin + jnp.floor((t - self.begin) / self.freq) * self.freq
        t = jnp.where(jnp.asarray(step) >= self.end, self.end, t)
        frac = 1.0 - (t - self.begin) / (self.end - self.begin)
        s = self.sparsity + (self.initial - self.sparsity) * frac**self.power
        return jnp.where(jnp.asarray(step) < self.begin, 0.0, s).astype(jnp.float32)

    def should_update(self, step):
        step = jnp.asarray(step)
        on_grid = (step - self.begin) % self.freq == 0
        return (step >= self.begin) & (step <= self.end) & (on_grid | (step == self.end))

    def final_sparsity(self) -> float:
        return self.sparsity


@dataclasses.dataclass(frozen=True)
class Iterative(Schedule):
    """Step to ``sparsities[i]`` at ``steps[i]`` (e.g. iterative pruning rounds).

    >>> s = Iterative(steps=(0, 10), sparsities=(0.5, 0.75))
    >>> float(s.sparsity_at(5)), float(s.sparsity_at(10)), bool(s.should_update(10))
    (0.5, 0.75, True)
    """

    steps: Sequence[int]
    sparsities: Sequence[float]

    def __post_init__(self) -> None:
        for i, st in enumerate(self.steps):
            _check_step(f"Iterative.steps[{i}]", st)
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        if len(self.steps) != len(self.sparsities) or not self.steps:
            raise ValueError("jaxprune: Iterative needs equally many (>0) steps and sparsities")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"jaxprune: Iterative steps must increase strictly, got {self.steps}")
        for i, s in enumerate(self.sparsities):
            check_sparsity(f"<schedule round {i}>", s)

    def sparsity_at(self, step):
        steps = jnp.asarray(self.steps)
        vals = jnp.asarray((0.0, *self.sparsities), jnp.float32)
        idx = jnp.sum(jnp.asarray(step) >= steps)
        return vals[idx]

    def should_update(self, step):
        return jnp.any(jnp.asarray(step) == jnp.asarray(self.steps))

    def final_sparsity(self) -> float:
        return self.sparsities[-1]
