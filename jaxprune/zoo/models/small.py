"""Small reference models for the digits experiments (linen and nnx twins with equal shapes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn
from flax import nnx


class MLP(nn.Module):
    """Linen MLP; ``features=(256, 256, 10)`` on flattened 8x8 digits gives 64-256-256-10.

    >>> p = MLP().init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    >>> p["Dense_0"]["kernel"].shape
    (64, 256)
    """

    features: Sequence[int] = (256, 256, 10)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class CNN(nn.Module):
    """Linen CNN for 8x8x1 images: two 3x3 convs, 2x2 avg-pool, two dense layers.

    >>> p = CNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    >>> p["Conv_1"]["kernel"].shape
    (3, 3, 32, 64)
    """

    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class NnxMLP(nnx.Module):
    """nnx twin of :class:`MLP`.

    >>> m = NnxMLP(64, rngs=nnx.Rngs(0))
    >>> m(jnp.zeros((2, 64))).shape
    (2, 10)
    """

    def __init__(self, in_features: int = 64, features: Sequence[int] = (256, 256, 10), *,
                 rngs: nnx.Rngs):
        dims = [in_features, *features]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class NnxCNN(nnx.Module):
    """nnx twin of :class:`CNN` (8x8x1 input).

    >>> m = NnxCNN(rngs=nnx.Rngs(0))
    >>> m(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    """

    def __init__(self, channels: Sequence[int] = (32, 64), hidden: int = 128,
                 num_classes: int = 10, in_channels: int = 1, image: int = 8, *, rngs: nnx.Rngs):
        chans = [in_channels, *channels]
        self.convs = nnx.List(
            [nnx.Conv(a, b, (3, 3), rngs=rngs) for a, b in zip(chans[:-1], chans[1:], strict=True)]
        )
        flat = (image // 2) * (image // 2) * chans[-1]
        self.fc1 = nnx.Linear(flat, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        x = nnx.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        return self.fc2(jax.nn.relu(self.fc1(x)))


def rebuild_small(model: Any, params: Any) -> Any:
    """A :mod:`jaxprune.zoo.models.small` linen ``MLP``/``CNN`` configured for (slim) ``params``.

    >>> import numpy as np
    >>> rebuild_small(MLP(), {"Dense_0": {"kernel": np.ones((64, 7))},
    ...                       "Dense_1": {"kernel": np.ones((7, 10))}}).features
    (7, 10)
    """
    def outs(prefix):
        ks = sorted((k for k in params if k.startswith(prefix)), key=lambda k: int(k.split("_")[1]))
        return tuple(int(params[k]["kernel"].shape[-1]) for k in ks)

    if isinstance(model, MLP):
        return model.clone(features=outs("Dense_"))
    if isinstance(model, CNN):
        dense = outs("Dense_")
        return model.clone(channels=outs("Conv_"), hidden=dense[0], num_classes=dense[-1])
    raise TypeError(
        f"jaxprune.zoo.models.rebuild_small: unsupported model {type(model).__name__}; build the "
        "config from the slim param shapes yourself"
    )
