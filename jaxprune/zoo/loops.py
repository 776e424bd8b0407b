"""Small, reusable classification training loops (used by the demo and the experiments).

>>> import optax, jax
>>> from jaxprune.zoo.models import MLP
>>> from jaxprune.zoo.data import load_digits
>>> x, y = load_digits("train")
>>> params, _, hist = train_classifier(MLP(), optax.adam(1e-3), x, y, steps=5, batch_size=32,
...                                    progress=False)
>>> len(hist["loss"])
5
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels.

    >>> float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 1]))) == float(jnp.log(4.))
    True
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(
    apply_fn: Callable[..., jax.Array], tx: optax.GradientTransformation
) -> Callable[[PyTree, Any, jax.Array, jax.Array], tuple[PyTree, Any, jax.Array]]:
    """A jitted ``(params, opt_state, x, y) -> (params, opt_state, loss)`` for ``apply_fn(vars, x)``.

    The step also takes a static ``mask_update=`` (``None``, ``True``, ``False``), passed to
    ``tx.update`` when not ``None`` (the host-side hint of jaxprune's mask-holding transforms).

    >>> step = make_train_step(lambda v, x: x @ v["params"]["w"], optax.sgd(0.1))
    """

    def loss_fn(params, x, y):
        return cross_entropy(apply_fn({"params": params}, x), y)

    @functools.partial(jax.jit, static_argnames="mask_update")
    def step(params, opt_state, x, y, mask_update=None):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        hint = {} if mask_update is None else {"mask_update": mask_update}
        updates, opt_state = tx.update(grads, opt_state, params, **hint)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


# ``apply_fn`` is static: a bound ``model.apply`` of equal models hashes equal, so repeated
# evaluations reuse one compile per batch shape
_predict_jit = jax.jit(lambda apply_fn, p, xb: jnp.argmax(apply_fn({"params": p}, xb), -1),
                       static_argnums=0)


def accuracy(apply_fn: Callable[..., jax.Array], params: PyTree, x: np.ndarray, y: np.ndarray,
             batch_size: int = 512) -> float:
    """Top-1 accuracy of ``apply_fn({"params": params}, x)``.

    >>> accuracy(lambda v, x: x, {}, np.eye(3, dtype=np.float32), np.arange(3))
    1.0
    """
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = _predict_jit(apply_fn, params, x[i:i + batch_size])
        correct += int((np.asarray(pred) == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """Endless shuffled ``(x, y)`` batches of exactly ``batch_size`` (epoch remainder dropped).

    >>> xb, yb = next(batches(np.arange(10), np.arange(10), 4, seed=0))
    >>> xb.shape, bool((xb == yb).all())
    ((4,), True)
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"batches: x has {n} examples but y has {len(y)}")
    if not 0 < batch_size <= n:
        raise ValueError(f"batches: batch_size must be in [1, {n}] (the number of examples), "
                         f"got {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]


def train_classifier(
    model: nn.Module,
    tx: optax.GradientTransformation,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    params: PyTree | None = None,
    progress: bool = True,
    desc: str = "train",
    mask_update_every: int | None = None,
) -> tuple[PyTree, Any, dict[str, Any]]:
    """Train a linen classifier with ``tx``; returns ``(params, opt_state, history)``.

    ``history`` has per-step ``loss`` and the measured ``steps_per_s`` (excluding the first,
    compiling step). ``steps`` must be >= 1. ``mask_update_every=ΔT`` (SET/RigL's
    ``update_period``) tells ``tx`` on the host which steps may update masks
    (``mask_update=(i % ΔT == 0)``): the other steps run without the mask-update ``lax.cond``.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"train_classifier: steps must be a positive integer, got {steps!r}")
    if mask_update_every is not None and (
            isinstance(mask_update_every, bool) or not isinstance(mask_update_every, int)
            or mask_update_every < 1):
        raise ValueError("train_classifier: mask_update_every must be a positive int or None, "
                         f"got {mask_update_every!r}")
    if params is None:
        params = model.init(jax.random.key(seed), x[:1])["params"]
    opt_state = tx.init(params)
    step = make_train_step(model.apply, tx)
    it = batches(x, y, batch_size, seed)
    losses = []
    rng = range(steps)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc=desc, leave=False)
    t0 = None
    for i in rng:
        xb, yb = next(it)
        hint = None if mask_update_every is None else i % mask_update_every == 0
        params, opt_state, loss = step(params, opt_state, xb, yb, hint)
        losses.append(loss)
        if i == 0:
            jax.block_until_ready(loss)
            t0 = time.perf_counter()
    jax.block_until_ready(params)
    dt = time.perf_counter() - t0 if t0 is not None else 0.0
    hist = {
        "loss": [float(v) for v in losses],
        "steps_per_s": (steps - 1) / dt if steps > 1 and dt > 0 else float("nan"),
    }
    return params, opt_state, hist
