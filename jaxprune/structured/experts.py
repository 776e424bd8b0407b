"""Mixture-of-experts pruning: experts found from the computation, expert calibration, REAP,
frequency, frequency-weighted merging and STUN (experts, then one-shot pruning inside survivors).

* :func:`find_experts` — an *expert layer* is a dependency group (:func:`discover_groups`) that holds
  a **batch** axis of stacked expert matmul weights (the operator map's ``batch``) and the **output**
  axis of one unbatched matmul (the router): removing an expert removes its router column and its
  slice of every stacked weight. Nothing is read from names.
* :func:`calibrate_experts` — one traced pass per batch (``core.evaluate`` hooks on the operator
  map's taps): at the router matmul its input rows and logits (→ gates, via ``gates=``), at each
  batched expert matmul the rows routed to every expert (empty capacity slots are all-zero rows and
  are not counted) reduced to per-expert ``XᵀX``, sums and counts — so SparseGPT gets each expert's
  own Hessian. (Plain :func:`jaxprune.oneshot.calibrate` refuses batched expert weights rather than
  mix experts.) Expert slots are paired with router tokens by their input rows (a dispatched row is a
  copy of the router's input row); if no exact copy exists the pairing is refused, naming the layer.
* Criteria (higher = kept): ``"frequency"`` (share of tokens routed to the expert), ``"reap"`` (mean
  over its routed tokens of gate × ‖expert output‖, REAP), ``"gate"`` (mean gate mass).
  :func:`choose_experts` selects through :func:`~jaxprune.structured.importance.choose_units` (the core
  pipeline); :func:`remove_experts` slims; :func:`merge_experts` is the merging baseline (each removed
  expert joins the kept expert with the most similar weights; a cluster's weights are its members'
  frequency-weighted average; the kept expert's router column stays); :func:`prune_experts` runs a
  one-shot layer method (Wanda, SparseGPT, magnitude) on every expert's own matrix; STUN is
  :func:`remove_experts` then :func:`prune_experts`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> p = {"r": jnp.ones((4, 3)), "w": jnp.ones((3, 4, 2))}
    >>> def fn(p, x):
    ...     sel = jax.nn.one_hot(jnp.argmax(x @ p["r"], -1), 3)          # top-1 routing (t, E)
    ...     return jnp.einsum("te,etf->tf", sel, jnp.einsum("etd,edf->etf",
    ...                       jnp.broadcast_to(x, (3, *x.shape)), p["w"]))
    >>> [(e.router, e.experts) for e in find_experts(fn, p, jnp.ones((5, 4)))]
    [('r', (('w', 0),))]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core import evaluate as ev
from jaxprune.core import opmap as om_lib
from jaxprune.core.masks import PyTree, leaves_with_paths
from jaxprune.oneshot.calibration import LayerStats
from jaxprune.structured.groups import Group, discover_groups
from jaxprune.structured.importance import Selection, choose_units
from jaxprune.structured.slimming import slim

__all__ = ["ExpertLayer", "ExpertStats", "find_experts", "TopKGates", "topk_gates", "calibrate_experts",
           "expert_scores", "choose_experts", "remove_experts", "merge_experts", "prune_experts",
           "CRITERIA"]

_HI = jax.lax.Precision.HIGHEST
CRITERIA = ("frequency", "reap", "gate")


@dataclasses.dataclass(frozen=True)
class ExpertLayer:
    """One MoE layer: its dependency ``group``, the router weight (``router``, output axis
    ``router_axis``) and the stacked expert weights ``experts`` as ``(path, expert axis)``."""

    group: Group
    router: str
    router_axis: int
    experts: tuple[tuple[str, int], ...]
    views: tuple[Any, ...] = dataclasses.field(default=(), compare=False)

    @property
    def name(self) -> str:
        """The group's name (the key of scores and selections)."""
        return self.group.name

    @property
    def size(self) -> int:
        """Number of experts."""
        return self.group.size


def find_experts(fn: Callable[..., Any], params: PyTree, *args: Any) -> list[ExpertLayer]:
    """The MoE layers of ``fn(params, *args)`` (see the module docstring); ``[]`` when none."""
    om = om_lib.operator_map(fn, params, *args)
    out = []
    for g in discover_groups(fn, params, *args):
        def is_w(m: Any) -> bool:
            return m.path in om and om[m.path].is_weight and len(m.sizes) == 1

        ex = tuple((m.path, m.axis) for m in g.members if is_w(m) and m.axis in om[m.path].batch)
        rt = [(m.path, m.axis) for m in g.members
              if is_w(m) and not om[m.path].batch and m.axis in om[m.path].out]
        if ex and len(rt) == 1:
            if any(om[p].batch != (a,) for p, a in ex):
                continue  # the expert axis must be the only batch axis of each expert matmul
            out.append(ExpertLayer(g, rt[0][0], rt[0][1], ex, tuple(om[p] for p, _ in ex)))
    return out


@dataclasses.dataclass(frozen=True)
class TopKGates:
    """Gates from router logits ``(tokens, E)``: softmax, keep the top ``k``, renormalise (zeros
    elsewhere) — the routing of :mod:`jaxprune.zoo.models.moe` and of Mixtral-style routers.
    Hashable, so calibration programs are cached per gate rule.

    >>> np.round(np.asarray(TopKGates(2)(jnp.log(jnp.array([[0.5, 0.3, 0.2]]))), np.float64), 3).tolist()
    [[0.625, 0.375, 0.0]]
    """

    k: int

    def __call__(self, logits: jax.Array) -> jax.Array:
        p = jax.nn.softmax(logits.astype(jnp.float32), -1)
        kth = jax.lax.top_k(p, self.k)[0][..., -1:]
        g = jnp.where(p >= kth, p, 0.0)
        return g / g.sum(-1, keepdims=True)


def topk_gates(k: int) -> TopKGates:
    """:class:`TopKGates` for top-``k`` routing.

    >>> topk_gates(2) == topk_gates(2)
    True
    """
    return TopKGates(int(k))


class ExpertStats(NamedTuple):
    """Calibration of one MoE layer (numpy, over all calibration tokens).

    ``tokens``: router tokens; ``routed[e]``: tokens routed to expert ``e``; ``gate_sum[e]``: Σ gates;
    ``reap_sum[e]``: Σ over routed tokens of gate × ‖expert output‖; ``weights``: ``{expert weight
    path: [LayerStats of expert e]}`` (each expert's own input statistics, fan-in view).
    """

    tokens: int
    routed: np.ndarray
    gate_sum: np.ndarray
    reap_sum: np.ndarray
    weights: dict[str, list[LayerStats]]

    @property
    def frequency(self) -> np.ndarray:
        """Share of tokens routed to each expert."""
        return self.routed / max(self.tokens, 1)

    @property
    def reap(self) -> np.ndarray:
        """REAP: mean over each expert's routed tokens of gate × ‖output‖ (0 for an unused expert)."""
        return self.reap_sum / np.maximum(self.routed, 1)


def _data_rows(eqn: Any, x: jax.Array, opi: int) -> jax.Array:
    """A batched matmul's data operand as ``(E, rows, fan_in)``."""
    m = ev.dot_operand(eqn, x, opi, weight=False)
    return m.reshape(m.shape[0], -1, m.shape[-1])


def _weight_mat(eqn: Any, w: jax.Array, opi: int) -> jax.Array:
    """The batched weight operand as ``(E, fan_in, out)`` (contraction order of the equation)."""
    m = ev.dot_operand(eqn, w, opi, weight=True)
    return m.reshape(m.shape[0], m.shape[-2], -1)


def _hook(layers: Sequence[ExpertLayer], gates: Callable, out: dict) -> Any:
    router_of = {lay.router: lay for lay in layers}
    expert_of = {p: lay for lay in layers for p, _ in lay.experts}
    seen: dict[str, dict] = {}

    def hook(eqn: Any, ins: list[Any], taps: list[tuple[int, str, bool]]) -> None:
        for opi, path, _ in taps:
            if path in router_of:
                lay = router_of[path]
                rows, _ = ev.dot_rows(eqn, ins[1 - opi], opi, path)
                y = eqn.primitive.bind(*ins, **eqn.params)
                y = y.reshape(rows.shape[0], -1) if opi == 1 else y.reshape(-1, rows.shape[0]).T
                if y.shape[1] != lay.size:
                    raise ValueError(f"jaxprune: router '{path}' gives {y.shape[1]} logits per token, "
                                     f"the expert layer '{lay.name}' has {lay.size} experts")
                g = gates(y)
                seen[lay.name] = {"rows": rows.astype(jnp.float32), "gates": g, "in": None}
                out[lay.name] = {"tokens": jnp.asarray(rows.shape[0], jnp.float32),
                                 "routed": (g > 0).sum(0).astype(jnp.float32), "gate_sum": g.sum(0)}
            elif path in expert_of:
                lay = expert_of[path]
                if lay.name not in seen:
                    raise ValueError(f"jaxprune: expert weight '{path}' runs before its router "
                                     f"'{lay.router}'; calibrate_experts needs the router first")
                x = _data_rows(eqn, ins[1 - opi], opi).astype(jnp.float32)
                if x.shape[0] != lay.size:
                    raise ValueError(f"jaxprune: '{path}' is not applied as a batched matmul over its "
                                     f"{lay.size} experts")
                nz = jnp.any(x != 0, axis=-1).astype(jnp.float32)
                xw = x * nz[..., None]
                out[path] = {"gram": jnp.einsum("enk,enj->ekj", xw, x, precision=_HI),
                             "sum": xw.sum(1), "sumsq": (xw * x).sum(1), "count": nz.sum(1)}
                st = seen[lay.name]
                if st["in"] is None:
                    st["in"], st["nz"] = x, nz
                y = jnp.einsum("enk,eko->eno", x, _weight_mat(eqn, ins[opi], opi).astype(jnp.float32),
                               precision=_HI)
                st["out"] = y  # the last expert matmul of the layer gives the experts' outputs
                st["n_done"] = st.get("n_done", 0) + 1
                if st["n_done"] == len(lay.experts):
                    _reap(lay, st, out)
        return None

    return hook


def _reap(lay: ExpertLayer, st: dict, out: dict) -> None:
    x, nz, r, g, y = st["in"], st["nz"], st["rows"], st["gates"], st["out"]
    if x.shape[-1] != r.shape[-1] or y.shape[1] != x.shape[1]:
        raise ValueError(f"jaxprune: expert layer '{lay.name}': the experts' input rows do not match "
                         "the router's input rows; cannot pair expert slots with tokens")
    d2 = (jnp.sum(x * x, -1)[..., None] - 2 * jnp.einsum("enk,tk->ent", x, r, precision=_HI)
          + jnp.sum(r * r, -1)[None, None, :])
    tok = jnp.argmin(d2, -1)                                                  # (E, N)
    err = jnp.sqrt(jnp.maximum(jnp.take_along_axis(d2, tok[..., None], -1)[..., 0], 0.0))
    scale = jnp.sqrt(jnp.sum(x * x, -1)) + 1e-6
    gate = jnp.take_along_axis(g.T, tok, axis=1)                              # (E, N)
    norm = jnp.sqrt(jnp.sum(y * y, -1))
    out[lay.name]["reap_sum"] = jnp.sum(nz * gate * norm, 1)
    out[lay.name]["match_err"] = jnp.max(nz * err / scale)
    out[lay.name]["slots"] = nz.sum(1)


@functools.lru_cache(maxsize=32)
def _program(fn: Callable, treedef: Any, layers: tuple, gates: Callable) -> Callable:
    """One jitted calibration program per (model function, params structure, layers, gates)."""

    return ev.tapped_program(fn, treedef, lambda out, an: _hook(layers, gates, out))


def calibrate_experts(
    fn: Callable[..., Any],
    params: PyTree,
    batches: Iterable[Any],
    layers: Sequence[ExpertLayer],
    *,
    gates: Callable[[jax.Array], jax.Array],
) -> dict[str, ExpertStats]:
    """Router gates and per-expert activations over calibration ``batches``: ``{layer name:
    ExpertStats}``. ``gates(logits (tokens, E)) -> (tokens, E)`` turns the router matmul's output
    into the model's gates (zero = not routed), e.g. :func:`topk_gates`.

    Raises ``ValueError`` naming the layer when expert slots cannot be paired with router tokens, or
    when the routed-token counts of the router and of the expert buffers disagree (dropped tokens).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = {p for p, _ in leaves_with_paths(params)}
    for lay in layers:
        for p in (lay.router, *(q for q, _ in lay.experts)):
            if p not in paths:
                raise ValueError(f"jaxprune: expert layer '{lay.name}' names '{p}', not in params")

    try:
        run = _program(fn, treedef, tuple(layers), gates)
    except TypeError as e:  # an unhashable function or gate rule: compile for this call only
        if "unhashable" not in str(e):
            raise
        run = _program.__wrapped__(fn, treedef, tuple(layers), gates)
    acc: dict = {}
    for b in batches:
        part = jax.device_get(run(leaves, b if isinstance(b, tuple) else (b,)))
        for k, v in part.items():
            if k in acc:
                acc[k] = {n: (np.maximum(acc[k][n], v[n]) if n == "match_err" else acc[k][n] + v[n])
                          for n in v}
            else:
                acc[k] = dict(v)
    res = {}
    for lay in layers:
        if lay.name not in acc or "reap_sum" not in acc[lay.name]:
            raise ValueError(f"jaxprune: calibration never reached expert layer '{lay.name}'")
        a = acc[lay.name]
        if float(a["match_err"]) > 1e-3:
            raise ValueError(f"jaxprune: expert layer '{lay.name}': an expert's input row is not a copy "
                             f"of any router input row (relative distance {float(a['match_err']):.3g}); "
                             "REAP needs the experts to read the router's input")
        if not np.array_equal(a["slots"], a["routed"]):
            raise ValueError(f"jaxprune: expert layer '{lay.name}': the router routed {a['routed']} "
                             f"tokens per expert but the experts received {a['slots']} (dropped "
                             "tokens, or gates= does not match the model's routing)")
        ws = {}
        for p, _ in lay.experts:
            s = acc[p]
            ws[p] = [LayerStats(s["gram"][e], s["sum"][e], s["sumsq"][e], int(round(s["count"][e])),
                                int(s["sum"].shape[1])) for e in range(lay.size)]
        res[lay.name] = ExpertStats(int(a["tokens"]), a["routed"], a["gate_sum"], a["reap_sum"], ws)
    return res


def expert_scores(stats: Mapping[str, ExpertStats], criterion: str = "reap") -> dict[str, np.ndarray]:
    """``{layer name: score per expert}`` by ``"frequency"``, ``"reap"`` or ``"gate"`` (higher = kept).

    >>> s = ExpertStats(4, np.array([3., 1.]), np.array([2., .5]), np.array([6., 4.]), {})
    >>> expert_scores({"l": s}, "reap")["l"].tolist(), expert_scores({"l": s}, "frequency")["l"].tolist()
    ([2.0, 4.0], [0.75, 0.25])
    """
    if criterion not in CRITERIA:
        raise ValueError(f"jaxprune: unknown expert criterion '{criterion}'; valid: {list(CRITERIA)}")
    f = {"frequency": lambda s: s.frequency, "reap": lambda s: s.reap,
         "gate": lambda s: s.gate_sum / max(s.tokens, 1)}[criterion]
    return {k: np.asarray(f(s), np.float64) for k, s in stats.items()}


def choose_experts(scores: Mapping[str, np.ndarray], layers: Sequence[ExpertLayer], fraction: float,
                   *, min_keep: int = 1) -> Selection:
    """Remove ``fraction`` of each layer's experts (lowest scores) through the core pipeline
    (:func:`~jaxprune.structured.importance.choose_units`); keep at least ``min_keep`` (top-k)."""
    return choose_units(scores, [lay.group for lay in layers], fraction, min_keep=min_keep)


def remove_experts(params: PyTree, layers: Sequence[ExpertLayer], keep: Mapping[str, Any]) -> PyTree:
    """Slim: delete the removed experts' slices of every stacked weight and their router columns."""
    return slim(params, [lay.group for lay in layers], keep)


def _get(params: PyTree, path: str) -> Any:
    return dict(leaves_with_paths(params))[path]


def merge_experts(params: PyTree, layers: Sequence[ExpertLayer], keep: Mapping[str, Any],
                  stats: Mapping[str, ExpertStats]) -> PyTree:
    """Frequency-weighted merging (the baseline of the merging papers): every removed expert joins
    the kept expert whose concatenated weights are most similar (cosine); each cluster's expert
    weights become the routed-frequency-weighted average of its members; then slim as
    :func:`remove_experts` (the kept expert's router column stays)."""
    flat = dict(leaves_with_paths(params))
    new = dict(flat)
    for lay in layers:
        kept = np.asarray(keep[lay.name], int)
        ws = [np.moveaxis(np.asarray(flat[p], np.float64), a, 0) for p, a in lay.experts]
        vec = np.concatenate([w.reshape(lay.size, -1) for w in ws], 1)
        vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        sim = vec @ vec[kept].T
        owner = kept[np.argmax(sim, 1)]
        owner[kept] = kept
        freq = np.asarray(stats[lay.name].routed, np.float64) + 1e-9
        for (p, a), w in zip(lay.experts, ws, strict=True):
            m = w.copy()
            for e in kept:
                mem = np.nonzero(owner == e)[0]
                m[e] = np.tensordot(freq[mem] / freq[mem].sum(), w[mem], axes=1)
            new[p] = jnp.asarray(np.moveaxis(m, 0, a), flat[p].dtype)
    merged = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params),
                                          [new[p] for p in flat])
    return remove_experts(merged, layers, keep)


def prune_experts(params: PyTree, layers: Sequence[ExpertLayer], stats: Mapping[str, ExpertStats],
                  method: Any, sparsity: float | None = None, *, pattern: Any = "unstructured"
                  ) -> tuple[PyTree, dict[str, np.ndarray]]:
    """A one-shot layer method (``jaxprune.oneshot.Wanda()``, ``SparseGPT()``, ``Magnitude()``...) on
    every expert's own ``(fan_in, out)`` matrix with that expert's own statistics (its Hessian from
    the tokens routed to it): N:M groups and per-row choices never mix experts, each expert gets
    ``sparsity``. Returns ``(params, {expert weight path: mask})``."""
    om_flat = dict(leaves_with_paths(params))
    new, masks = dict(om_flat), {}
    for lay in layers:
        if len(lay.views) != len(lay.experts):
            raise ValueError(f"jaxprune: expert layer '{lay.name}' has no matrix views; use find_experts")
        for (p, _), lo in zip(lay.experts, lay.views, strict=True):
            w = om_flat[p]
            if tuple(w.shape) != lo.shape:
                raise ValueError(f"jaxprune: '{p}' has shape {tuple(w.shape)}, the expert layer was "
                                 f"found on shape {lo.shape}; call find_experts on these params")
            k, n = lo.fan_in_size, lo.view_shape[1]
            mats = lo.to_view(w).reshape(lay.size, k, n)        # expert e's own (fan_in, out) matrix
            outs, ms = [], []
            for e in range(lay.size):
                st = stats[lay.name].weights[p][e]
                if st.fan_in != k:
                    raise ValueError(f"jaxprune: expert {e} of '{p}': calibration fan-in {st.fan_in}, "
                                     f"matrix fan-in {k}")
                nw, m = method(mats[e], st, sparsity, pattern=pattern, name=f"{p}[expert {e}]")
                outs.append(jnp.asarray(nw, w.dtype))
                ms.append(jnp.asarray(m))
            new[p] = lo.from_view(jnp.stack(outs).reshape(lay.size * k, n))
            masks[p] = np.asarray(lo.from_view(jnp.stack(ms).reshape(lay.size * k, n)))
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [new[p] for p in om_flat])
    return tree, masks
