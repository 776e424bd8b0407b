"""Reference Flax models: MLP and a small CNN, in linen and nnx.

>>> import jax, jax.numpy as jnp
>>> from jaxprune.zoo.models import CNN
>>> params = CNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
>>> sorted(params)
['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1']
"""

from jaxprune.zoo.models.gemma import Gemma, GemmaConfig
from jaxprune.zoo.models.gguf_loader import load_gemma
from jaxprune.zoo.models.small import CNN, MLP, NnxCNN, NnxMLP, rebuild_small

__all__ = ["MLP", "CNN", "NnxMLP", "NnxCNN", "rebuild_small", "Gemma", "GemmaConfig", "load_gemma"]
