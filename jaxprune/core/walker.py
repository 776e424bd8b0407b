"""A generic jaxpr interpreter over an abstract value domain, driven by a table of per-primitive rules.

The walker knows nothing about what its values mean. It keeps an environment ``{jaxpr variable:
value}``, gives literals and constants the domain's *data* value, recurses into the sub-jaxprs of
call-like primitives (``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``,
``remat``/``checkpoint``, ...) and looks every other primitive up in ``rules``. A rule is a function
``rule(eqn: Eqn, ins: list[V]) -> list[V]`` from the input values to the output values; control-flow
rules (``scan``, ``cond``, ``while``) run their bodies with :meth:`Eqn.run`. A primitive without a
rule goes to ``default``: by default its outputs are data when no input carries a parameter, and
otherwise a :class:`TraceError` names the primitive and the parameters that flow into it.

The dependency-group analysis (:mod:`jaxprune.structured.rules`) is one domain; any other analysis
(e.g. which parameter axes each ``dot_general`` contracts) brings its own values and rules table.

Example (a domain whose value is the set of parameter names an array depends on):
    >>> import jax, jax.numpy as jnp
    >>> rules = {"add": lambda e, ins: [set().union(*ins)], "mul": lambda e, ins: [set().union(*ins)]}
    >>> w = Walker(rules, data=lambda shape: set(), sources=lambda v: v)
    >>> j = jax.make_jaxpr(lambda a, b, x: (a + x) * b)(1.0, 2.0, 3.0).jaxpr
    >>> [sorted(v) for v in w.run(j, [{"a"}, {"b"}, set()])]
    [['a', 'b']]
    >>> try:
    ...     w.run(jax.make_jaxpr(lambda a: jnp.sin(a))(1.0).jaxpr, [{"a"}])
    ... except TraceError as err:
    ...     print(err)
    jaxprune: the jaxpr walker does not understand primitive 'sin', which consumes arrays derived
    from parameter(s) ['a'].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from jax.extend import core as jcore

__all__ = ["TraceError", "Eqn", "Rule", "Walker", "CALLS", "shape_of", "sub_jaxpr"]

V = TypeVar("V")


class TraceError(ValueError):
    """The jaxpr walker met a primitive it cannot reason about on a parameter-derived array."""


#: call-like primitives whose sub-jaxpr is walked in place (inputs map 1:1 onto its invars)
CALLS = frozenset({
    "pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2", "named_call",
})


def shape_of(v: Any) -> tuple[int, ...]:
    """Static shape of a jaxpr variable or literal.

    >>> import jax
    >>> shape_of(jax.make_jaxpr(lambda x: x)(jnp.ones((2, 3))).jaxpr.invars[0])
    (2, 3)
    """
    return tuple(int(d) for d in getattr(v.aval, "shape", ()))


def sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """``(jaxpr, consts)`` of a call-like equation whose sub-jaxpr takes exactly its inputs.

    >>> import jax
    >>> e = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x))(1.0).jaxpr.eqns[0]
    >>> len(sub_jaxpr(e)[0].eqns)
    1
    """
    if eqn.primitive.name not in CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if isinstance(j, jcore.ClosedJaxpr) and len(j.jaxpr.invars) == len(eqn.invars):
            return j.jaxpr, j.consts
        if isinstance(j, jcore.Jaxpr) and len(j.invars) == len(eqn.invars):
            return j, ()
    return None


@dataclass(frozen=True)
class Eqn(Generic[V]):
    """What a rule sees of one equation: its name, params, static shapes, and the walker."""

    walker: Walker[V]
    eqn: Any
    name: str
    params: Mapping[str, Any]
    in_shapes: tuple[tuple[int, ...], ...]
    out_shapes: tuple[tuple[int, ...], ...]

    def run(self, jaxpr: Any, ins: Sequence[V], consts: Sequence[Any] = ()) -> list[V]:
        """Walk a sub-jaxpr (a ``scan``/``cond``/``while`` body) with the given input values.

        ``jaxpr`` may be a ``ClosedJaxpr`` (its consts become data values).
        """
        if isinstance(jaxpr, jcore.ClosedJaxpr):
            jaxpr, consts = jaxpr.jaxpr, jaxpr.consts
        return self.walker.run(jaxpr, list(ins), consts)

    def error(self, ins: Sequence[V], why: str = "") -> TraceError:
        """A :class:`TraceError` naming this primitive, ``why``, and the parameters in ``ins``."""
        return self.walker.error(self.name, ins, why)


Rule = Callable[[Eqn[Any], list[Any]], list[Any]]


class Walker(Generic[V]):
    """Interpret jaxprs over values of type ``V``.

    Args:
      rules: ``{primitive name: rule}``.
      data: the value of a data array of a given shape (literals, constants, default outputs).
      sources: the parameter names a value depends on (for errors and the default rule).
      default: rule for primitives without an entry in ``rules`` (default: data outputs when no
        input depends on a parameter, else a :class:`TraceError`).
      who: prefix of error messages; hint: appended to them (``{name}`` is the primitive).
    """

    def __init__(
        self,
        rules: Mapping[str, Rule],
        *,
        data: Callable[[tuple[int, ...]], V],
        sources: Callable[[V], Iterable[str]],
        default: Rule | None = None,
        who: str = "jaxprune: the jaxpr walker",
        hint: str = "",
    ) -> None:
        self.rules = dict(rules)
        self.data = data
        self.sources = sources
        self.default = default if default is not None else self._default
        self.who = who
        self.hint = hint

    def run(self, jaxpr: Any, ins: Sequence[V], consts: Sequence[Any] = ()) -> list[V]:
        """Walk ``jaxpr`` (a ``Jaxpr``) with one value per invar; return one value per outvar."""
        env: dict[Any, V] = {}
        for v in jaxpr.constvars:
            env[v] = self.data(shape_of(v))
        if len(ins) != len(jaxpr.invars):
            raise ValueError(f"{self.who}: {len(ins)} input values for {len(jaxpr.invars)} invars")
        for v, val in zip(jaxpr.invars, ins, strict=True):
            env[v] = val
        for eqn in jaxpr.eqns:
            outs = self.step(eqn, [self._read(env, v) for v in eqn.invars])
            for v, val in zip(eqn.outvars, outs, strict=True):
                env[v] = val
        return [self._read(env, v) for v in jaxpr.outvars]

    def step(self, eqn: Any, ins: list[V]) -> list[V]:
        """Output values of one equation: its rule, a call's sub-jaxpr, or the default."""
        name = eqn.primitive.name
        e = Eqn(self, eqn, name, eqn.params, tuple(shape_of(v) for v in eqn.invars),
                tuple(shape_of(v) for v in eqn.outvars))
        rule = self.rules.get(name)
        if rule is None:
            sub = sub_jaxpr(eqn)
            if sub is not None:
                return self.run(sub[0], ins, sub[1])
            rule = self.default
        outs = list(rule(e, ins))
        if len(outs) != len(eqn.outvars):
            raise AssertionError(f"{self.who}: rule for '{name}' returned {len(outs)} values for "
                                 f"{len(eqn.outvars)} outputs")
        return outs

    def _read(self, env: dict[Any, V], v: Any) -> V:
        if isinstance(v, jcore.Literal):
            return self.data(shape_of(v))
        return env[v]

    def param_names(self, ins: Iterable[V]) -> list[str]:
        """Sorted parameter names the values depend on."""
        return sorted({s for v in ins for s in self.sources(v)})

    def _default(self, e: Eqn[V], ins: list[V]) -> list[V]:
        if not self.param_names(ins):
            return [self.data(s) for s in e.out_shapes]
        raise e.error(ins)

    def error(self, name: str, ins: Iterable[V], why: str = "") -> TraceError:
        """A :class:`TraceError` naming the primitive and the parameters flowing into it."""
        msg = (f"{self.who} does not understand primitive '{name}'" + (f" ({why})" if why else "")
               + f", which consumes arrays derived from parameter(s) {self.param_names(ins)}.")
        if self.hint:
            msg += " " + self.hint.format(name=name)
        return TraceError(msg)
