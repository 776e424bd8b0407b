"""Checkpoints, compact sparse checkpoints and sharding.

* :mod:`~jaxprune.io.checkpoint` — Orbax checkpoints of the whole training state, exact resume.
* :mod:`~jaxprune.io.compact` — compact sparse checkpoints that store the packed formats of
  :mod:`jaxprune.kernels.formats`.
* :mod:`~jaxprune.io.sharding` — params, masks and optimizer state on a device mesh.
"""

from jaxprune.io import checkpoint, compact, sharding

__all__ = ["checkpoint", "compact", "sharding"]
