"""Device meshes for data-parallel (and FSDP-ready) training.

nps uses ``jax.jit`` with ``NamedSharding`` over a ``Mesh`` rather than ``pmap``:
the same program runs on one CPU, a GPU box or a TPU slice. Batches (the task
axis of ``Episodes``) are split over the ("data", "fsdp") axes; the small reward
models are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nps.errors import ConfigError

BATCH_AXES = ("data", "fsdp")
MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over the visible devices; ``data`` defaults to the rest.

    Batches split over data × fsdp; decoder weights over fsdp (model dimension) and
    tensor (heads, MLP width, vocabulary) — see ``nps.lm.sharding``.
    """
    devices = jax.devices()
    data = len(devices) // (fsdp * tensor) if data is None else data
    if min(data, fsdp, tensor) < 1 or data * fsdp * tensor > len(devices):
        raise ConfigError(
            f"mesh data={data} × fsdp={fsdp} × tensor={tensor} does not fit the {len(devices)} visible devices"
        )
    shape = (data, fsdp, tensor)
    return Mesh(np.asarray(devices[: data * fsdp * tensor]).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (task) axis split over every batch axis of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(mesh: Mesh, batch_size: int, field: str = "train.batch_size") -> None:
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if batch_size % shards:
        raise ConfigError(f"{field}={batch_size} must be divisible by the mesh's {shards} batch shards")
