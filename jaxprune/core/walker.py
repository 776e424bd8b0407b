"""A generic jaxpr walker: run a table of per-primitive rules over a traced function.

Analyses of "the model by its computation" — the operator map (:mod:`jaxprune.core.opmap`: which
parameter axes each matmul contracts) and structured pruning's dependency groups
(:mod:`jaxprune.structured.groups`) — are abstract interpretations of the model's jaxpr: every
variable carries an abstract value of the analysis' own domain, and a *rule* per primitive maps the
values of an equation's inputs to the values of its outputs. This module owns the part they share:

* the environment (variables → values, literals and constants through ``literal``/``const``),
* recursion into the sub-jaxprs of call-like primitives (``jit``/``pjit``, ``closed_call``,
  ``core_call``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat``/``checkpoint``,
  ``named_call``), so wrappers are transparent,
* dispatch: ``rules[primitive name]``, else ``default`` (which may raise a clear error).

Higher-order primitives with their own semantics (``scan``, ``cond``, ``while``) are rules of the
analysis, which call :meth:`Walker.run` on the bodies.

Example:
    >>> import jax, jax.numpy as jnp
    >>> closed = jax.make_jaxpr(lambda w, x: jax.jit(jnp.tanh)(x @ w))(jnp.ones((2, 3)), jnp.ones((1, 2)))
    >>> seen = []
    >>> def default(walker, eqn, ins):
    ...     seen.append(eqn.primitive.name)
    ...     return [None] * len(eqn.outvars)
    >>> _ = Walker({}, default).run(closed.jaxpr, [None, None], closed.consts)
    >>> seen  # the jit boundary is walked through
    ['dot_general', 'tanh']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jax.extend import core as jcore

__all__ = ["Rule", "Walker", "CALL_PRIMITIVES", "sub_jaxpr", "shape_of"]

Rule = Callable[["Walker", Any, list[Any]], list[Any]]

CALL_PRIMITIVES = frozenset({
    "pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint", "named_call", "custom_lin",
})


def shape_of(v: Any) -> tuple[int, ...]:
    """The static shape of a jaxpr variable or literal (``()`` for tokens and scalars).

    >>> import jax, jax.numpy as jnp
    >>> shape_of(jax.make_jaxpr(jnp.sum)(jnp.ones((2, 3))).jaxpr.invars[0])
    (2, 3)
    """
    return tuple(int(d) for d in getattr(getattr(v, "aval", None), "shape", ()))


def sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """``(jaxpr, consts)`` of a call-like equation whose sub-jaxpr takes exactly its operands.

    >>> import jax, jax.numpy as jnp
    >>> e = jax.make_jaxpr(jax.jit(jnp.sin))(1.0).jaxpr.eqns[0]
    >>> sub_jaxpr(e)[0].eqns[0].primitive.name
    'sin'
    """
    if eqn.primitive.name not in CALL_PRIMITIVES:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if isinstance(j, jcore.ClosedJaxpr) and len(j.jaxpr.invars) == len(eqn.invars):
            return j.jaxpr, j.consts
        if isinstance(j, jcore.Jaxpr) and len(j.invars) == len(eqn.invars):
            return j, ()
    return None


class Walker:
    """Abstract interpreter of a jaxpr with a rules table.

    Args:
      rules: ``{primitive name: rule}``; a rule is ``rule(walker, eqn, in_values) -> out_values``
        (one value per ``eqn.outvars``).
      default: the rule for primitives not in ``rules`` (and not call-like).
      literal: the value of a literal / constant operand, from its jaxpr variable or literal
        (default ``None``).
    """

    def __init__(self, rules: Mapping[str, Rule], default: Rule,
                 literal: Callable[[Any], Any] | None = None):
        self.rules = dict(rules)
        self.default = default
        self.literal = literal or (lambda v: None)

    def read(self, env: dict[Any, Any], v: Any) -> Any:
        """The value of variable or literal ``v`` in ``env``."""
        if isinstance(v, jcore.Literal):
            return self.literal(v)
        return env[v]

    def run(self, jaxpr: Any, in_values: Sequence[Any], consts: Sequence[Any] = ()) -> list[Any]:
        """Walk ``jaxpr`` (a ``Jaxpr`` or ``ClosedJaxpr``) from ``in_values``; its output values."""
        del consts  # constants are valued by ``literal`` from their variables
        if isinstance(jaxpr, jcore.ClosedJaxpr):
            jaxpr = jaxpr.jaxpr
        env: dict[Any, Any] = {}
        for v in jaxpr.constvars:
            env[v] = self.literal(v)
        if len(in_values) != len(jaxpr.invars):
            raise ValueError(
                f"jaxprune: walker got {len(in_values)} input values for a jaxpr with "
                f"{len(jaxpr.invars)} inputs"
            )
        for v, val in zip(jaxpr.invars, in_values, strict=True):
            env[v] = val
        for eqn in jaxpr.eqns:
            ins = [self.read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, val in zip(eqn.outvars, outs, strict=True):
                env[v] = val
        return [self.read(env, v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        """Values of one equation's outputs: its rule, a call's sub-jaxpr, or the default."""
        name = eqn.primitive.name
        rule = self.rules.get(name)
        if rule is not None:
            return rule(self, eqn, ins)
        sub = sub_jaxpr(eqn)
        if sub is not None:
            return self.run(sub[0], ins, sub[1])
        return self.default(self, eqn, ins)
