"""Checkpoints, compact sparse checkpoints and sharding.

* :mod:`~jaxprune.io.checkpoint` — Orbax checkpoints of the whole training state, exact resume.
* :mod:`~jaxprune.io.data` — data iterators whose position is checkpointed; grain per-process
  batches whose state restores under any process count.
* :mod:`~jaxprune.io.compact` — compact sparse checkpoints that store the packed formats of
  :mod:`jaxprune.kernels.formats`.
* :mod:`~jaxprune.io.sharding` — params, masks and optimizer state on a device mesh.
* :mod:`~jaxprune.io.distributed` — multi-process jobs: ``initialize``, a mesh over all processes,
  per-process data, a cross-process consistency check of masks.
* :mod:`~jaxprune.io.launch` — start N processes of one job on this machine, fail fast.
"""

from jaxprune.io import checkpoint, compact, data, distributed, launch, sharding

__all__ = ["checkpoint", "compact", "data", "distributed", "launch", "sharding"]
