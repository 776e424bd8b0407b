"""Bad inputs across the public API: each is refused with a clear error.

Every case asserts the exception type and a message fragment that names the argument or leaf and
says what would be valid. Cases are tiny (a few small arrays, no model training) so the whole file
stays cheap. """

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune.core import criteria as crit_lib
from jaxprune.core import filters as F
from jaxprune.core import patterns as pat_lib
from jaxprune.core import pipeline
from jaxprune.oneshot.common import check_layer_weight

K = jnp.arange(1.0, 33.0).reshape(8, 4)  # a Dense kernel (in=8, out=4)
P = {"d": {"kernel": K, "bias": jnp.ones(4)}}
M = {"d": {"kernel": jnp.ones((8, 4), bool), "bias": None}}
ALL = F.Everything()

CASES: list[Any] = []


def case(id: str, exc: type[BaseException] | tuple, match: str,
         marks: Any = ()) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register ``fn`` as a bad-input case: calling it must raise ``exc`` matching ``match``."""

    def deco(fn: Callable[[], Any]) -> Callable[[], Any]:
        CASES.append(pytest.param(fn, exc, match, id=id, marks=marks))
        return fn

    return deco


def add(id: str, fn: Callable[[], Any], exc: type[BaseException] | tuple, match: str,
        marks: Any = ()) -> None:
    CASES.append(pytest.param(fn, exc, match, id=id, marks=marks))


# ----------------------------------------------------------------------------------------------
# sparsity values, through every entry point that takes one
# ----------------------------------------------------------------------------------------------

BAD_SPARSITY = [
    ("str", "0.5", ValueError, r"sparsity must be a float.*'0\.5'"),
    ("word", "half", ValueError, r"sparsity must be a float.*'half'"),
    ("neg", -0.1, ValueError, r"sparsity.*must be in \[0, 1\).*-0\.1"),
    ("one", 1.0, ValueError, r"sparsity.*must be in \[0, 1\).*1\.0"),
    ("big", 1.5, ValueError, r"sparsity.*must be in \[0, 1\).*1\.5"),
    ("nan", math.nan, ValueError, r"sparsity.*must be in \[0, 1\).*nan"),
    ("inf", math.inf, ValueError, r"sparsity.*must be in \[0, 1\).*inf"),
    ("list", [0.5], (TypeError, ValueError), r"sparsity must be a (float|number)"),
    ("bool", True, TypeError, r"sparsity must be a (float|number).*True"),
]

SPARSITY_ENTRY_POINTS: dict[str, Callable[[Any], Any]] = {
    "prune": lambda s: jp.prune(P, s, filter=ALL),
    "prune_erk": lambda s: jp.prune(P, s, allocation="erk", filter=ALL),
    "prune_global": lambda s: jp.prune(P, s, allocation="global", filter=ALL),
    "compute_masks": lambda s: jp.compute_masks(M, P, s),
    "leaf_mask": lambda s: jp.leaf_mask(K, s),
    "resolve_sparsity": lambda s: pipeline.resolve_sparsity(s, "unstructured"),
    "polynomial": lambda s: jp.Polynomial(s, begin=0, end=10, freq=1),
    "oneshot_schedule": lambda s: jp.OneShot(s, step=0),
    "gradual_magnitude": lambda s: jp.gradual_magnitude(optax.sgd(0.1), s, 0, 10, 1),
    "ste_masks": lambda s: jp.training.ste_masks(P, s, pattern="unstructured", filter=ALL),
    "sparse_init": lambda s: jp.training.sparse_init(P, s, allocation="uniform", filter=ALL),
}

for _name, _fn in SPARSITY_ENTRY_POINTS.items():
    for _id, _val, _exc, _match in BAD_SPARSITY:
        add(f"sparsity-{_id}-{_name}", (lambda f, v: lambda: f(v))(_fn, _val), _exc, _match)

# None where no pattern implies one
for _name in ("prune", "compute_masks", "leaf_mask", "resolve_sparsity", "ste_masks"):
    add(f"sparsity-none-{_name}", (lambda f: lambda: f(None))(SPARSITY_ENTRY_POINTS[_name]),
        ValueError, r"needs an explicit sparsity")

# ----------------------------------------------------------------------------------------------
# patterns
# ----------------------------------------------------------------------------------------------

BAD_PATTERNS = [
    ("block0x4", "block0x4", ValueError, r"block.*must be >= 1.*0x4"),
    ("block4x0", "block4x0", ValueError, r"block.*must be >= 1.*4x0"),
    ("nm-0-4", "0:4", ValueError, r"N:M needs 0 < n <= m.*0:4"),
    ("nm-5-4", "5:4", ValueError, r"N:M needs 0 < n <= m.*5:4"),
    ("nm-2-0", "2:0", ValueError, r"N:M needs 0 < n <= m.*2:0"),
    ("nm-4-4-dense", "4:4", ValueError, r"N:M needs 0 < n <= m|4:4.*prunes nothing"),
    ("empty", "", ValueError, r"unknown pattern ''.*valid"),
    ("typo", "2x4", ValueError, r"unknown pattern '2x4'.*valid"),
    ("none", None, TypeError, r"pattern must be a Pattern or a spec string.*None"),
    ("int", 4, TypeError, r"pattern must be a Pattern or a spec string.*int"),
    ("tuple", (2, 4), TypeError, r"pattern must be a Pattern or a spec string.*tuple"),
]
PATTERN_ENTRY_POINTS: dict[str, Callable[[Any], Any]] = {
    "parse": lambda p: pat_lib.parse(p),
    "prune": lambda p: jp.prune(P, 0.5, pattern=p, filter=ALL),
    "leaf_mask": lambda p: jp.leaf_mask(K, 0.5, pattern=p),
    "compute_masks": lambda p: jp.compute_masks(M, P, 0.5, pattern=p),
}
for _name, _fn in PATTERN_ENTRY_POINTS.items():
    for _id, _val, _exc, _match in BAD_PATTERNS:
        if _id == "nm-4-4-dense":
            continue
        add(f"pattern-{_id}-{_name}", (lambda f, v: lambda: f(v))(_fn, _val), _exc, _match)

add("pattern-NM-ctor-n0", lambda: jp.NM(0, 4), ValueError, r"0 < n <= m")
add("pattern-NM-ctor-float", lambda: jp.NM(2.5, 4), TypeError, r"N:M.*integers.*2\.5")
add("pattern-NM-ctor-axis-str", lambda: jp.NM(2, 4, axis="0"), TypeError, r"axis.*int")
add("pattern-Block-ctor-zero", lambda: jp.Block(0, 4), ValueError, r"block.*>= 1")
add("pattern-Block-ctor-neg", lambda: jp.Block(4, -2), ValueError, r"block.*>= 1")
add("pattern-Block-ctor-float", lambda: jp.Block(2.0, 4), TypeError, r"block.*integers")
add("pattern-Channel-ctor-str", lambda: jp.Channel(axis="out"), TypeError, r"Channel.*axis.*int")
add("pattern-nm-axis-out-of-range", lambda: jp.leaf_mask(K, pattern=jp.NM(2, 4, axis=5)),
    ValueError, r"axis 5.*'<leaf>'.*ndim 2")
add("pattern-channel-axis-out-of-range", lambda: jp.leaf_mask(K, 0.5, pattern=jp.Channel(axis=3)),
    ValueError, r"axis 3.*'<leaf>'.*ndim 2")
add("pattern-nm-indivisible", lambda: jp.leaf_mask(jnp.ones((6, 4)), pattern="2:4"),
    ValueError, r"axis 0 has length 6.*not divisible by m=4")
add("pattern-block-indivisible", lambda: jp.leaf_mask(jnp.ones((6, 4)), 0.5, pattern="block4x4"),
    ValueError, r"block \(4, 4\) does not divide")
add("pattern-nm-target-above", lambda: jp.prune(P, 0.9, pattern="2:4", filter=ALL),
    ValueError, r"sparsity 0\.9 is above what pattern 2:4 can reach \(0\.5\)")
add("pattern-nm-target-below", lambda: jp.prune(P, 0.1, pattern="2:4", filter=ALL),
    ValueError, r"sparsity 0\.1.*pattern 2:4.*(0\.5|cannot)")
add("pattern-channel-rounds-to-all", lambda: jp.leaf_mask(K, 0.9, pattern="channel"),
    ValueError, r"sparsity 0\.9 with pattern Channel.*prunes all of '<leaf>'.*rounds to 1\.0")
add("pattern-block-rounds-to-all", lambda: jp.leaf_mask(K, 0.9, pattern="block4x4"),
    ValueError, r"sparsity 0\.9 with pattern Block.*prunes all of '<leaf>'")
add("pattern-perleaf-bad-regex", lambda: jp.PerLeaf((("(", "2:4"),)), ValueError,
    r"PerLeaf.*regex.*'\('")
add("pattern-perleaf-bad-spec", lambda: jp.PerLeaf((("kernel", "3x"),)), ValueError,
    r"unknown pattern '3x'")
add("pattern-register-noncallable", lambda: pat_lib.register("zz_bad", 3), TypeError,
    r"needs a callable")

# ----------------------------------------------------------------------------------------------
# leaves: 0-d, zero-size, integer, bool, complex, NaN/Inf, not an array
# ----------------------------------------------------------------------------------------------

LEAVES = [
    ("scalar", jnp.float32(3.0), ValueError, r"'w'.*0-d|'w'.*scalar"),
    ("zero-size", jnp.zeros((0, 4)), ValueError, r"'w'.*(zero-size|no entries|size 0)"),
    ("int", jnp.arange(8).reshape(2, 4), TypeError, r"'w'.*dtype int32.*floating"),
    ("bool", jnp.ones((2, 4), bool), TypeError, r"'w'.*dtype bool.*floating"),
    ("nan", jnp.ones((2, 4)).at[0, 1].set(jnp.nan), ValueError, r"'w'.*non-finite.*nan"),
    ("inf", jnp.ones((2, 4)).at[1, 1].set(jnp.inf), ValueError, r"'w'.*non-finite.*inf"),
]
for _id, _leaf, _exc, _match in LEAVES:
    add(f"leaf-{_id}-prune", (lambda x: lambda: jp.prune({"w": x}, 0.5, filter=ALL))(_leaf),
        _exc, _match)
    add(f"leaf-{_id}-init_masks",
        (lambda x: lambda: jp.prune({"w": x}, 0.5, criterion="random", key=jax.random.key(0),
                                    filter=ALL))(_leaf), _exc, _match)
for _id, _leaf, _exc, _match in LEAVES[:2]:
    add(f"leaf-{_id}-leaf_mask", (lambda x: lambda: jp.leaf_mask(x, 0.5, path="w"))(_leaf),
        _exc, _match)
    add(f"leaf-{_id}-nm", (lambda x: lambda: jp.leaf_mask(x, pattern="2:4", path="w"))(_leaf),
        _exc, _match)
    add(f"leaf-{_id}-block", (lambda x: lambda: jp.leaf_mask(x, 0.5, pattern="block4x4",
                                                           path="w"))(_leaf), _exc, _match)
    add(f"leaf-{_id}-channel", (lambda x: lambda: jp.leaf_mask(x, 0.5, pattern="channel",
                                                             path="w"))(_leaf), _exc, _match)
add("leaf-nan-scores-leaf_mask", lambda: jp.leaf_mask(K.at[0, 0].set(jnp.nan), 0.5, path="w"),
    ValueError, r"scores for 'w'.*non-finite")
add("leaf-nan-scores-compute", lambda: jp.compute_masks(M, {"d": {"kernel": K.at[1, 2].set(
    jnp.nan), "bias": jnp.ones(4)}}, 0.5), ValueError, r"scores for 'd/kernel'.*non-finite")

# ----------------------------------------------------------------------------------------------
# masks: apply_masks / check_masks / compute_masks trees
# ----------------------------------------------------------------------------------------------

add("masks-broadcast-apply", lambda: jp.apply_masks({"w": K}, {"w": jnp.ones((1, 4), bool)}),
    ValueError, r"mask for 'w' has shape \(1, 4\) but the param has shape \(8, 4\)")
add("masks-broadcast-check", lambda: jp.check_masks({"w": K}, {"w": jnp.ones((1, 4), bool)}),
    ValueError, r"mask for 'w' has shape \(1, 4\)")
add("masks-transposed-apply", lambda: jp.apply_masks({"w": K}, {"w": jnp.ones((4, 8), bool)}),
    ValueError, r"mask for 'w' has shape \(4, 8\)")
add("masks-float-half-check", lambda: jp.check_masks({"w": K}, {"w": jnp.full((8, 4), 0.5)}),
    TypeError, r"mask for 'w' has dtype float32.*bool")
add("masks-float-half-apply", lambda: jp.apply_masks({"w": K}, {"w": jnp.full((8, 4), 0.5)}),
    TypeError, r"mask for 'w' has dtype float32.*bool")
add("masks-int-two-check", lambda: jp.check_masks({"w": K}, {"w": jnp.full((8, 4), 2)}),
    TypeError, r"mask for 'w' has dtype int32.*bool")
add("masks-numpy-float-apply", lambda: jp.apply_masks({"w": K}, {"w": np.ones((8, 4))}),
    TypeError, r"mask for 'w' has dtype float64.*bool")
add("masks-python-bool-leaf", lambda: jp.apply_masks({"w": K}, {"w": True}),
    TypeError, r"mask for 'w'.*(bool array|array)")
add("masks-missing-leaf-apply", lambda: jp.apply_masks(P, {"d": {"kernel": M["d"]["kernel"]}}),
    ValueError, r"mask tree does not match params tree.*'d/bias'")
add("masks-extra-leaf-apply", lambda: jp.apply_masks({"w": K}, {"w": None, "v": None}),
    ValueError, r"mask tree does not match params tree.*'v'")
add("masks-renamed-apply", lambda: jp.apply_masks({"w": K}, {"v": jnp.ones((8, 4), bool)}),
    ValueError, r"params has 'w' where masks has 'v'")
add("masks-list-vs-dict", lambda: jp.apply_masks({"w": K}, [jnp.ones((8, 4), bool)]),
    ValueError, r"mask tree does not match params tree")
add("masks-none-tree-apply", lambda: jp.apply_masks({"w": K}, None),
    ValueError, r"masks is None.*jp.init_masks")
add("masks-shape-compute", lambda: jp.compute_masks({"w": jnp.ones((4, 8), bool)}, {"w": K}, 0.5),
    ValueError, r"'w'.*shape")
add("masks-tree-compute", lambda: jp.compute_masks({"v": jnp.ones((8, 4), bool)}, {"w": K}, 0.5),
    ValueError, r"scores tree does not match masks.*'v'.*'w'")
add("masks-prune-existing-mismatch",
    lambda: jp.prune(P, 0.5, masks={"d": {"kernel": jnp.ones((4, 8), bool), "bias": None}}),
    ValueError, r"mask for 'd/kernel' has shape \(4, 8\)")
add("masks-keep_pruned-shape", lambda: jp.leaf_mask(K, 0.5, keep_pruned=jnp.ones(4, bool)),
    ValueError, r"keep_pruned mask for '<leaf>' has shape \(4,\)")
add("masks-n_keep-too-big", lambda: jp.leaf_mask(K, n_keep=40), ValueError,
    r"n_keep=40 is outside \[0, 32\]")
add("masks-n_keep-and-sparsity", lambda: jp.leaf_mask(K, 0.5, n_keep=3), ValueError,
    r"pass sparsity or n_keep, not both")
add("leaf_masks-length-mismatch", lambda: pipeline.leaf_masks([K, K], [3]), ValueError,
    r"2 scores, 1 n_keep, 2 keep_pruned and 2 paths")
add("leaf_masks-n_keep-too-big",
    lambda: pipeline.leaf_masks([K, K], [3, 33], paths=["a", "b"]), ValueError,
    r"leaf 'b': n_keep=33 is outside \[0, 32\]")
add("leaf_masks-keep_pruned-shape",
    lambda: pipeline.leaf_masks([K], [3], keep_pruned=[jnp.ones(3, bool)], paths=["w"]),
    ValueError, r"keep_pruned mask for 'w' has shape \(3,\)")
add("leaf_masks-scalar", lambda: pipeline.leaf_masks([jnp.ones(())], [0], paths=["s"]),
    ValueError, r"leaf 's' is 0-d")
add("leaf_masks-nonfinite",
    lambda: pipeline.leaf_masks([K.at[0, 1].set(jnp.nan)], [3], paths=["w"]), ValueError,
    r"scores for 'w' contain a non-finite value nan")
add("masks-n_keep-with-nm", lambda: jp.leaf_mask(K, n_keep=3, pattern="2:4"), ValueError,
    r"n_keep needs the unstructured pattern")
add("masks-total_sparsity-shape", lambda: jp.total_sparsity({"w": K}, {"w": jnp.ones(4, bool)}),
    ValueError, r"mask for 'w' has shape \(4,\)")

# ----------------------------------------------------------------------------------------------
# criteria, allocation, filters
# ----------------------------------------------------------------------------------------------

add("criterion-unknown", lambda: jp.prune(P, 0.5, criterion="magnitud"), ValueError,
    r"unknown criterion 'magnitud'.*magnitude")
add("criterion-none", lambda: jp.prune(P, 0.5, criterion=None), TypeError,
    r"criterion must be a Criterion or a name.*None")
add("criterion-missing-signal", lambda: jp.prune(P, 0.5, criterion="saliency", filter=ALL),
    ValueError, r"criterion 'saliency' needs.*grads")
add("criterion-random-no-key", lambda: jp.prune(P, 0.5, criterion="random", filter=ALL),
    ValueError, r"criterion 'random' needs.*key")
add("criterion-grads-tree-mismatch",
    lambda: jp.prune(P, 0.5, criterion="saliency", grads={"d": {"kernel": K}}, filter=ALL),
    ValueError, r"grads.*'d/bias'|grads.*does not match")
add("criterion-grads-shape", lambda: jp.prune(P, 0.5, criterion="saliency", filter=ALL,
                                              grads={"d": {"kernel": K.T, "bias": jnp.ones(4)}}),
    ValueError, r"grads.*'d/kernel'.*shape")
add("criterion-wanda-norms-shape", lambda: jp.prune(P, 0.5, criterion="wanda", filter=F.MinNdim(2),
                                                    act_norms={"d": {"kernel": jnp.ones(5),
                                                                     "bias": None}}),
    ValueError, r"criterion 'wanda' on 'd/kernel': input statistic of shape \(5,\)")
add("criterion-register-twice", lambda: crit_lib.register(crit_lib.get("magnitude")._replace(
    leaf_fn=lambda w: w)), ValueError, r"already registered.*overwrite=True")
add("allocation-unknown", lambda: jp.prune(P, 0.5, allocation="erkk"), ValueError,
    r"unknown allocation 'erkk'.*uniform")
add("allocation-none", lambda: jp.prune(P, 0.5, allocation=None), TypeError,
    r"allocation must be an Allocation or a name.*None")
add("allocation-override-bad", lambda: jp.prune(P, 0.5, allocation=jp.Uniform(
    overrides=(("kernel", 1.5),)), filter=ALL), ValueError,
    r"sparsity for 'override 'kernel'' must be in \[0, 1\).*1\.5")
add("allocation-override-str", lambda: jp.Uniform(overrides=(("kernel", "0.5"),)), TypeError,
    r"overrides.*kernel.*number")
add("allocation-override-not-pairs", lambda: jp.Uniform(overrides=("kernel",)), TypeError,
    r"overrides.*\(regex, sparsity\) pairs")
add("allocation-global-min-density", lambda: jp.Global(min_density=1.5), ValueError,
    r"min_density.*\[0, 1\].*1\.5")
add("allocation-global-min-density-neg", lambda: jp.Global(min_density=-0.1), ValueError,
    r"min_density.*\[0, 1\]")
add("filter-bad-type", lambda: jp.prune(P, 0.5, filter=3), TypeError, r"filter.*3")
add("filter-bad-regex", lambda: F.PathRegex("("), ValueError, r"PathRegex\('\('\) is not a valid regex")
add("filter-select-bad-min-ndim", lambda: F.select(min_ndim=-1), ValueError, r"min_ndim.*>= 0")
add("filter-dtype-kind", lambda: F.DType("floaty"), ValueError, r"DType.*'floaty'.*floating")
add("filter-predicate-noncallable", lambda: F.Predicate(3), TypeError, r"Predicate.*callable")
add("filter-name-nonstr", lambda: F.Name(3), TypeError, r"Name.*str.*3")

# ----------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------

add("schedule-poly-power-neg", lambda: jp.Polynomial(0.5, begin=0, end=10, power=-1),
    ValueError, r"power")
add("schedule-poly-power-zero", lambda: jp.Polynomial(0.5, begin=0, end=10, power=0),
    ValueError, r"power")
add("schedule-poly-power-nan", lambda: jp.Polynomial(0.5, begin=0, end=10, power=math.nan),
    ValueError, r"power")
add("schedule-poly-end-before-begin", lambda: jp.Polynomial(0.5, begin=10, end=5), ValueError,
    r"end.*begin|begin.*end")
add("schedule-poly-freq-zero", lambda: jp.Polynomial(0.5, begin=0, end=10, freq=0), ValueError,
    r"freq")
add("schedule-oneshot-neg-step", lambda: jp.OneShot(0.5, step=-1), ValueError, r"step")
add("schedule-oneshot-float-step", lambda: jp.OneShot(0.5, step=2.5), (TypeError, ValueError),
    r"step")
add("schedule-poly-begin-str", lambda: jp.Polynomial(0.5, begin="0", end=10), (TypeError, ValueError),
    r"begin")

# ----------------------------------------------------------------------------------------------
# training wrappers
# ----------------------------------------------------------------------------------------------

add("pruner-no-schedule", lambda: jp.pruner(optax.sgd(0.1)), TypeError, r"schedule")
add("pruner-schedule-float", lambda: jp.pruner(optax.sgd(0.1), schedule=0.5), TypeError,
    r"schedule.*Schedule.*0\.5")
add("pruner-inner-not-optax", lambda: jp.pruner("adam", schedule=jp.OneShot(0.5, step=0)),
    TypeError, r"inner must be an optax optimizer.*str")
add("pruner-bad-pattern", lambda: jp.pruner(optax.sgd(0.1), schedule=jp.OneShot(0.5, step=0),
                                            pattern="block0x4"), ValueError, r"block.*>= 1")
add("pruner-bad-criterion", lambda: jp.pruner(optax.sgd(0.1), schedule=jp.OneShot(0.5, step=0),
                                              criterion="nope"), ValueError,
    r"unknown criterion 'nope'")
add("pruner-nm-target-above", lambda: jp.gradual_magnitude(optax.sgd(0.1), 0.9, 0, 10, 1,
                                                           pattern="2:4"), ValueError,
    r"sparsity 0\.9 is above what pattern 2:4 can reach")
add("pruner-update-without-params", lambda: jp.pruner(
    optax.sgd(0.1), schedule=jp.OneShot(0.5, step=0)).update(P, jp.pruner(
        optax.sgd(0.1), schedule=jp.OneShot(0.5, step=0)).init(P)), ValueError, r"params")
add("ste-target-above-nm", lambda: jp.training.ste_masks(P, 0.9, pattern="2:4", filter=ALL),
    ValueError, r"sparsity 0\.9 is above")
add("rigl-bad-sparsity", lambda: jp.training.rigl(optax.sgd(0.1), 1.5), ValueError,
    r"sparsity.*\[0, 1\)")
add("rigl-bad-method", lambda: jp.training.sparse_training(optax.sgd(0.1), 0.5, method="foo"),
    ValueError, r"method.*'foo'.*rigl")
add("imp-sparsity-bad-rounds", lambda: jp.training.imp_sparsity(0.5, 1, 0), ValueError,
    r"round")


# ----------------------------------------------------------------------------------------------
# one-shot
# ----------------------------------------------------------------------------------------------


def _stats(fan_in: int, n: int = 16, seed: int = 0):
    from jaxprune.oneshot import LayerStats
    x = np.random.default_rng(seed).normal(size=(n, fan_in)).astype(np.float32)
    return LayerStats(gram=x.T @ x, sum=x.sum(0), sumsq=(x * x).sum(0), count=n, fan_in=fan_in)


def _layer(method: str, w: Any, stats: Any, sparsity: Any = 0.5, **kw: Any) -> Any:
    from jaxprune import oneshot
    return oneshot.get_method(method)(w, stats, sparsity, **kw)


for _m in ("sparsegpt", "obs", "wanda", "magnitude"):
    add(f"oneshot-{_m}-stats-other-layer", (lambda m: lambda: _layer(
        m, jnp.ones((8, 4)), _stats(4)))(_m), ValueError,
        r"kernel '<layer>' of shape \(8, 4\) does not match calibration fan-in 4")
    add(f"oneshot-{_m}-sparsity-big", (lambda m: lambda: _layer(
        m, K, _stats(8), 1.5))(_m), ValueError, r"sparsity.*\[0, 1\)")
    add(f"oneshot-{_m}-sparsity-str", (lambda m: lambda: _layer(
        m, K, _stats(8), "0.5"))(_m), (TypeError, ValueError), r"sparsity must be a")
    add(f"oneshot-{_m}-nan-weight", (lambda m: lambda: _layer(
        m, K.at[0, 0].set(jnp.nan), _stats(8), name="fc"))(_m), ValueError,
        r"'fc'.*non-finite", marks=())
    add(f"oneshot-{_m}-int-weight", (lambda m: lambda: _layer(
        m, jnp.arange(32).reshape(8, 4), _stats(8), name="fc"))(_m), TypeError,
        r"layer 'fc' has dtype int32")
    add(f"oneshot-{_m}-nan-weight-helper", (lambda m: lambda: check_layer_weight(
        K.at[0, 0].set(jnp.nan), "fc"))(_m), ValueError, r"layer 'fc' has a non-finite weight nan")
add("oneshot-stats-fan-in-divides", lambda: _layer("wanda", jnp.ones((8, 4)), _stats(2)),
    ValueError, r"kernel '<layer>' of shape \(8, 4\) does not match calibration fan-in 2")
add("oneshot-int-weight-helper", lambda: check_layer_weight(jnp.arange(4).reshape(2, 2), "fc"),
    TypeError, r"layer 'fc' has dtype int32")
add("oneshot-unknown-method", lambda: _layer("sparsegptt", K, _stats(8)), ValueError,
    r"unknown.*method.*'sparsegptt'")
add("oneshot-sparsegpt-blocksize-zero", lambda: __import__(
    "jaxprune.oneshot", fromlist=["x"]).SparseGPT(blocksize=0),
    ValueError, r"blocksize.*>= 1")
add("oneshot-percdamp-neg", lambda: __import__("jaxprune.oneshot", fromlist=["x"]).SparseGPT(
    percdamp=-1.0), ValueError, r"percdamp")
add("oneshot-dsnot-cycles", lambda: __import__("jaxprune.oneshot", fromlist=["x"]).DSnoT(
    max_cycles=-1), ValueError, r"max_cycles.*>= 0")
add("oneshot-nan-hessian", lambda: _layer("sparsegpt", K, _stats(8)._replace(
    gram=np.full((8, 8), np.nan, np.float32))), ValueError, r"Hessian.*non-finite|NaN|Inf")


def _owl(sparsity: Any, **kw: Any) -> Any:
    from jaxprune.oneshot import owl_sparsities
    rng = np.random.default_rng(0)
    kernels = {"a": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}
    return owl_sparsities(kernels, {"a": _stats(8), "b": _stats(8, seed=1)}, sparsity, **kw)


add("owl-target-1.5", lambda: _owl(1.5), ValueError, r"sparsity.*\[0, 1\).*1\.5")
add("owl-target-str", lambda: _owl("0.5"), (TypeError, ValueError), r"sparsity must be a")
add("owl-target-above-cap", lambda: _owl(0.995), ValueError, r"OWL sparsity 0\.995 is above the "
    r"per-layer cap 0\.99")
add("owl-lam-too-big", lambda: _owl(0.5, lam=0.7), ValueError, r"lam.*\[0, 0\.5\)")
add("owl-lam-neg", lambda: _owl(0.5, lam=-0.1), ValueError, r"lam")
add("owl-M-zero", lambda: _owl(0.5, M=0), ValueError, r"\bM\b")

# ----------------------------------------------------------------------------------------------
# structured
# ----------------------------------------------------------------------------------------------


def _mlp_groups():
    from jaxprune import structured as S
    params = {"a": {"kernel": K, "bias": jnp.ones(4)}, "b": {"kernel": jnp.ones((4, 3))}}
    groups = S.declare_groups([[("a/kernel", 1), ("a/bias", 0), ("b/kernel", 0)]], params,
                              names=["h"])
    return S, params, groups


def _choose(scores: Any, sparsity: Any = 0.5, **kw: Any) -> Any:
    S, params, groups = _mlp_groups()
    return S.choose_units({"h": scores}, groups, sparsity, **kw)


add("structured-nan-score", lambda: _choose(np.array([1.0, np.nan, 2.0, 3.0])), ValueError,
    r"'h'.*non-finite|NaN")
add("structured-score-len", lambda: _choose(np.array([1.0, 2.0])), ValueError,
    r"'h'.*2.*4|shape")
add("structured-sparsity-big", lambda: _choose(np.arange(4.0), 1.0), ValueError,
    r"sparsity.*\[0, 1\)")
add("structured-sparsity-str", lambda: _choose(np.arange(4.0), "0.5"), (TypeError, ValueError),
    r"sparsity must be a")
add("structured-unknown-group-score", lambda: __import__("jaxprune.structured", fromlist=["x"]
                                                         ).choose_units(
    {"zz": np.arange(4.0)}, _mlp_groups()[2], 0.5), ValueError, r"'h'|'zz'")


def _slim(keep: Any) -> Any:
    S, params, groups = _mlp_groups()
    return S.slim(params, groups, {"h": keep})


add("slim-float-keep", lambda: _slim(np.array([0.0, 2.5])), TypeError,
    r"keep for group 'h' must be integer unit indices.*float64")
add("slim-bool-wrong-len", lambda: _slim(np.array([True, False])), ValueError,
    r"keep for group 'h' is a bool mask of shape \(2,\), but the group has 4 units")
add("slim-index-out-of-range", lambda: _slim(np.array([0, 7])), ValueError,
    r"group 'h' must be unique and in \[0, 4\); got \[0, 7\]")
add("slim-duplicate-index", lambda: _slim(np.array([1, 1])), ValueError,
    r"group 'h' must be unique and in \[0, 4\); got \[1, 1\]")
add("slim-negative-index", lambda: _slim(np.array([-1, 0])), ValueError,
    r"'h'.*-1|out of range")
add("slim-keep-nothing", lambda: _slim(np.array([], np.int64)), ValueError,
    r"'h'.*(no unit|empty|at least one)")
add("slim-unknown-group", lambda: __import__("jaxprune.structured", fromlist=["x"]).slim(
    _mlp_groups()[1], _mlp_groups()[2], {"zz": np.array([0])}), ValueError, r"'zz'")
add("structured-declare-bad-path", lambda: __import__("jaxprune.structured", fromlist=["x"]
                                                      ).declare_groups([[("nope/kernel", 1)]], P),
    (KeyError, ValueError), r"'nope/kernel'")
add("structured-declare-bad-axis", lambda: __import__("jaxprune.structured", fromlist=["x"]
                                                      ).declare_groups([[("d/kernel", 5)]], P),
    ValueError, r"'d/kernel'.*axis 5")

# ----------------------------------------------------------------------------------------------
# kernels / formats
# ----------------------------------------------------------------------------------------------


def _F():
    from jaxprune.kernels import formats
    return formats


_NM_MASK = jnp.asarray(jp.leaf_mask(K, pattern="2:4"))
add("formats-pack_nm-m0", lambda: _F().pack_nm(K, _NM_MASK, 2, 0), ValueError, r"0 < n <= m")
add("formats-pack_nm-too-many", lambda: _F().pack_nm(K, jnp.ones((8, 4), bool), 2, 4),
    ValueError, r"group.*more than 2|> n")
add("formats-pack_nm-shape", lambda: _F().pack_nm(K, jnp.ones((4, 8), bool), 2, 4), ValueError,
    r"mask.*shape \(4, 8\).*\(8, 4\)")
add("formats-pack_nm-indivisible", lambda: _F().pack_nm(jnp.ones((6, 4)), jnp.ones((6, 4), bool),
                                                        2, 4), ValueError, r"6.*m=4|divisible")
add("formats-pack_nm-1d", lambda: _F().pack_nm(jnp.ones(8), jnp.ones(8, bool), 2, 4), ValueError,
    r"packed formats need a weight with >= 2 dims, got shape \(8,\)")
add("formats-pack_block-zero", lambda: _F().pack_block(K, jnp.ones((8, 4), bool), (0, 4)),
    ValueError, r"block must be positive, got \(0, 4\)")
add("formats-pack_block-indivisible", lambda: _F().pack_block(K, jnp.ones((8, 4), bool), (3, 4)),
    ValueError, r"block.*\(3, 4\).*divide|divisible")
add("formats-pack_block-mask-shape", lambda: _F().pack_block(K, jnp.ones((4, 4), bool), (4, 4)),
    ValueError, r"mask.*shape")
add("formats-pack_bitmask-shape", lambda: _F().pack_bitmask(K, jnp.ones(4, bool)), ValueError,
    r"mask.*shape")
add("formats-pack_bitmask-nnz", lambda: _F().pack_bitmask(K, jnp.ones((8, 4), bool), nnz_max=3),
    ValueError, r"nnz_max=3.*32")
add("formats-pack-float-mask", lambda: _F().pack_bitmask(K, jnp.full((8, 4), 0.5)), TypeError,
    r"pack_bitmask: mask must be a bool array.*float32")
add("formats-unpack-not-packed", lambda: _F().unpack(K), TypeError, r"packed format.*Array|"
    r"NMPacked")


def _kern(name: str, **kw: Any) -> Any:
    from jaxprune import kernels
    w = _F().pack_nm(K, _NM_MASK, 2, 4)
    x = kw.pop("x", jnp.ones((2, 8)))
    return getattr(kernels, name)(x, w, impl="reference", **kw)


add("kernels-nm-wrong-x-width", lambda: _kern("nm_matmul", x=jnp.ones((2, 5))), ValueError,
    r"x.*5.*8|width|contraction")
add("kernels-nm-bad-impl", lambda: __import__("jaxprune.kernels", fromlist=["x"]).nm_matmul(
    jnp.ones((2, 8)), _F().pack_nm(K, _NM_MASK, 2, 4), impl="fast"), ValueError, r"impl.*'fast'")
add("kernels-nm-tiles-zero", lambda: __import__("jaxprune.kernels", fromlist=["x"]).nm_matmul(
    jnp.ones((2, 8)), _F().pack_nm(K, _NM_MASK, 2, 4), tiles=(0, 0, 0)), ValueError,
    r"tiles.*positive|>= 1")
add("kernels-nm-w-not-packed", lambda: __import__("jaxprune.kernels", fromlist=["x"]).nm_matmul(
    jnp.ones((2, 8)), K), TypeError, r"NMPacked")


# ----------------------------------------------------------------------------------------------
# io
# ----------------------------------------------------------------------------------------------


def _io():
    from jaxprune.io import checkpoint, compact
    return checkpoint, compact


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


IO_CASES: list[Any] = []


def io_case(id: str, exc: Any, match: str):
    def deco(fn):
        IO_CASES.append(pytest.param(fn, exc, match, id=id))
        return fn
    return deco


@io_case("ckpt-negative-step", ValueError, r"step must be an integer >= 0.*-1")
def _(d):
    with _io()[0].CheckpointManager(d, async_save=False) as m:
        m.save(-1, {"w": K})


@io_case("ckpt-float-step", TypeError, r"step must be an integer >= 0.*2\.5")
def _(d):
    with _io()[0].CheckpointManager(d, async_save=False) as m:
        m.save(2.5, {"w": K})


@io_case("ckpt-existing-step", Exception, r"step 1 already exists.*force=True")
def _(d):
    with _io()[0].CheckpointManager(d, async_save=False) as m:
        m.save(1, {"w": K})
        m.save(1, {"w": K})


@io_case("ckpt-older-step", Exception, r"step 1 is older than the latest step 2")
def _(d):
    with _io()[0].CheckpointManager(d, async_save=False) as m:
        m.save(2, {"w": K})
        m.save(1, {"w": K})


@io_case("ckpt-max-to-keep-zero", ValueError, r"max_to_keep must be >= 1 or None")
def _(d):
    _io()[0].CheckpointManager(d, max_to_keep=0)


@io_case("ckpt-on-drop", ValueError, r"on_drop must be 'raise' or 'warn'")
def _(d):
    _io()[0].CheckpointManager(d, on_drop="silent")


@io_case("ckpt-restore-missing-step", Exception, r"no checkpoint for step 7.*have \[1\]")
def _(d):
    with _io()[0].CheckpointManager(d, async_save=False) as m:
        m.save(1, {"w": K})
        m.restore({"w": K}, step=7)


@io_case("ckpt-restore-other-model", ValueError, r"'w'.*shape \(8, 4\).*\(4, 8\)")
def _(d):
    with _io()[0].CheckpointManager(d, async_save=False) as m:
        m.save(1, {"w": K})
        m.restore({"w": K.T})


@io_case("ckpt-dir-is-file", Exception, r"cannot create checkpoint directory")
def _(d):
    (d / "f").write_text("x")
    _io()[0].CheckpointManager(d / "f" / "c")


@io_case("compact-off-mask-values", ValueError, r"'d/kernel'.*masked-off entries are nonzero.*"
         r"drop_off_mask=True")
def _(d):
    m = {"d": {"kernel": jnp.zeros((8, 4), bool).at[:4].set(True), "bias": None}}
    _io()[1].save_sparse(d / "s", P, m)


@io_case("compact-wrong-pattern", ValueError, r"'d/kernel'.*2:4")
def _(d):
    _io()[1].save_sparse(d / "s", P, M, pattern="2:4")


@io_case("compact-exists", FileExistsError, r"exists")
def _(d):
    (d / "s").mkdir()
    _io()[1].save_sparse(d / "s", P, M)


@io_case("compact-float-mask", TypeError, r"mask for 'd/kernel' has dtype float32.*bool")
def _(d):
    _io()[1].save_sparse(d / "s", P, {"d": {"kernel": jnp.full((8, 4), 0.5), "bias": None}})


@io_case("compact-missing", FileNotFoundError, r"not a complete sparse checkpoint")
def _(d):
    _io()[1].load_sparse(d / "nope")


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

CLI_CASES = [
    ("mesh-2", ["run", "sparse_pretrain", "--mesh", "2"],
     r"--mesh: must be 'auto' or data,model \(two integers >= 1, e\.g\. 2,4\), got '2'", ()),
    ("mesh-zero", ["run", "sparse_pretrain", "--mesh", "0,4"], r"--mesh: must be 'auto' or", ()),
    ("batch-0", ["run", "sparse_pretrain", "--batch", "0"],
     r"--batch: must be a positive integer \(>= 1\), got 0", ()),
    ("steps-neg", ["run", "sparse_training", "--steps", "-5"],
     r"--steps: must be a positive integer \(>= 1\), got -5", ()),
    ("seeds-empty", ["run", "sparse_training", "--seeds", ""], r"--seeds", ()),
    ("unknown-experiment", ["run", "no_such_study"], r"no_such_study", ()),
]


# ----------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn,exc,match", CASES)
def test_bad_input_is_refused_clearly(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("fn,exc,match", IO_CASES)
def test_bad_io_input_is_refused_clearly(fn, exc, match, tmp):
    with pytest.raises(exc, match=match):
        fn(tmp)


@pytest.mark.parametrize("argv,match", [pytest.param(a, m, id=i, marks=k)
                                        for i, a, m, k in CLI_CASES])
def test_bad_cli_argument_is_refused_clearly(argv, match, capsys):
    from jaxprune import cli
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    import re
    assert re.search(match, err), err[-2000:]


def test_nan_scores_rank_lowest_under_jit():
    """Eager calls refuse NaN scores; traced ones (the training-time mask update) cannot, so NaN
    ranks lowest there: the NaN entry is pruned first, deterministically. Oracle: the mask of the
    same scores with NaN replaced by -inf."""
    scores = jnp.array([[3.0, jnp.nan], [1.0, 2.0], [jnp.nan, 5.0], [4.0, 0.5]])
    masks = {"w": jnp.ones((4, 2), bool)}
    got = jax.jit(lambda s: jp.compute_masks(masks, {"w": s}, 0.25)["w"])(scores)
    want = np.ones((4, 2), bool)
    want[0, 1] = want[2, 0] = False  # the two NaNs are the 2 pruned entries (0.25 * 8)
    np.testing.assert_array_equal(np.asarray(got), want)
    got_nm = jax.jit(lambda s: jp.leaf_mask(s, pattern=jp.NM(1, 2, axis=1)))(scores)
    np.testing.assert_array_equal(np.asarray(got_nm)[:, 0], [True, False, False, True])


def test_mesh_shape_parser():
    """The validation helper behind the (lead-wired) ``--mesh`` cases."""
    import argparse

    from experiments import _common
    assert _common.mesh_shape("2,4") == (2, 4) and _common.mesh_shape("AUTO") == "auto"
    for bad in ("2", "0,4", "a,b", "2,4,1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="two integers >= 1"):
            _common.mesh_shape(bad)


@pytest.mark.parametrize("target,lam", [(0.98, 0.3), (0.6, 0.49), (0.02, 0.3), (0.5, 0.0)])
def test_owl_honours_the_mean_when_clipping(target, lam):
    """Oracle: the size-weighted mean of the per-layer sparsities equals the target, every value
    is in [0, 0.99], and the order follows the outlier ratios (more outliers = less pruned)."""
    from jaxprune.oneshot.owl import owl_from_ratios
    ratios, sizes = [0.0, 0.01, 0.05, 0.2], [100, 300, 50, 550]
    sp = np.array(owl_from_ratios(ratios, sizes, target, lam))
    assert np.all((sp >= 0) & (sp <= 0.99))
    assert float(np.dot(sp, sizes) / np.sum(sizes)) == pytest.approx(target, abs=1e-6)
    assert np.all(np.diff(sp) <= 1e-9)


def test_there_are_at_least_200_cases():
    assert len(CASES) + len(IO_CASES) + len(CLI_CASES) >= 200
