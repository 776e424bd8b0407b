"""Sparsity schedules: plain functions of the step, usable under ``jit``.

A schedule is a frozen dataclass with ``sparsity(step)`` (the target at ``step``) and
``should_update(step)`` (whether masks are recomputed at ``step``). Both take a traced int and use
only ``jnp`` ops, so a schedule lives inside a jitted train step.

Example:
    >>> s = Polynomial(target=0.9, begin=0, end=100, freq=10)
    >>> [round(float(s.sparsity(t)), 4) for t in (0, 50, 100)]
    [0.0, 0.7875, 0.9]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.core.allocation import check_sparsity

__all__ = ["Schedule", "OneShot", "Polynomial", "Iterative"]


class Schedule:
    """Base class: ``sparsity(step) -> float32`` and ``should_update(step) -> bool``."""

    def sparsity(self, step: Any) -> jax.Array:
        raise NotImplementedError

    def should_update(self, step: Any) -> jax.Array:
        raise NotImplementedError

    def final_sparsity(self) -> float:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class OneShot(Schedule):
    """Prune to ``target`` once, at ``step``.

    >>> s = OneShot(0.5, step=3)
    >>> float(s.sparsity(2)), float(s.sparsity(3)), bool(s.should_update(3))
    (0.0, 0.5, True)
    """

    target: float
    step: int = 0

    def __post_init__(self) -> None:
        check_sparsity("<schedule target>", self.target)

    def sparsity(self, step):
        return jnp.where(jnp.asarray(step) >= self.step, self.target, 0.0).astype(jnp.float32)

    def should_update(self, step):
        return jnp.asarray(step) == self.step

    def final_sparsity(self) -> float:
        return self.target


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
    """Zhu & Gupta (2017) gradual pruning, mask updates every ``freq`` steps in ``[begin, end]``.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** power`` evaluated at the latest
    update step ``t <= step`` (so the sparsity is constant between updates).

    >>> s = Polynomial(0.8, begin=10, end=30, freq=10)
    >>> [bool(s.should_update(t)) for t in (9, 10, 15, 20, 30, 40)]
    [False, True, False, True, True, False]
    """

    target: float
    begin: int
    end: int
    freq: int = 100
    initial: float = 0.0
    power: float = 3.0

    def __post_init__(self) -> None:
        check_sparsity("<schedule target>", self.target)
        check_sparsity("<schedule initial>", self.initial)
        if self.freq <= 0:
            raise ValueError(f"jaxprune: Polynomial.freq must be > 0, got {self.freq}")
        if self.end <= self.begin:
            raise ValueError(
                f"jaxprune: Polynomial needs end > begin, got begin={self.begin}, end={self.end}"
            )

    def sparsity(self, step):
        t = jnp.asarray(step, jnp.float32)
        t = jnp.clip(t, self.begin, self.end)
        t = self.begin + jnp.floor((t - self.begin) / self.freq) * self.freq
        t = jnp.where(jnp.asarray(step) >= self.end, self.end, t)
        frac = 1.0 - (t - self.begin) / (self.end - self.begin)
        s = self.target + (self.initial - self.target) * frac**self.power
        return jnp.where(jnp.asarray(step) < self.begin, 0.0, s).astype(jnp.float32)

    def should_update(self, step):
        step = jnp.asarray(step)
        on_grid = (step - self.begin) % self.freq == 0
        return (step >= self.begin) & (step <= self.end) & (on_grid | (step == self.end))

    def final_sparsity(self) -> float:
        return self.target


@dataclasses.dataclass(frozen=True)
class Iterative(Schedule):
    """Step to ``sparsities[i]`` at ``steps[i]`` (e.g. iterative pruning rounds).

    >>> s = Iterative(steps=(0, 10), sparsities=(0.5, 0.75))
    >>> float(s.sparsity(5)), float(s.sparsity(10)), bool(s.should_update(10))
    (0.5, 0.75, True)
    """

    steps: Sequence[int]
    sparsities: Sequence[float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        if len(self.steps) != len(self.sparsities) or not self.steps:
            raise ValueError("jaxprune: Iterative needs equally many (>0) steps and sparsities")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"jaxprune: Iterative steps must increase strictly, got {self.steps}")
        for i, s in enumerate(self.sparsities):
            check_sparsity(f"<schedule round {i}>", s)

    def sparsity(self, step):
        steps = jnp.asarray(self.steps)
        vals = jnp.asarray((0.0, *self.sparsities), jnp.float32)
        idx = jnp.sum(jnp.asarray(step) >= steps)
        return vals[idx]

    def should_update(self, step):
        return jnp.any(jnp.asarray(step) == jnp.asarray(self.steps))

    def final_sparsity(self) -> float:
        return self.sparsities[-1]
