"""Device meshes for data-parallel (and FSDP-ready) training.

nps uses ``jax.jit`` with ``NamedSharding`` over a ``Mesh`` rather than ``pmap``:
the same program runs on one CPU, a GPU box or a TPU slice. Batches (the task
axis of ``Episodes``) are split over the ("data", "fsdp") axes; weights, trainable or
frozen, by their logical axes (``nps.lm.sharding``): the reward models, which have none,
are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nps.errors import ConfigError

BATCH_AXES = ("data", "fsdp")
MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: the visible devices); ``data``
    defaults to the rest.

    Batches split over data × fsdp; decoder weights over fsdp (model dimension) and tensor
    (heads, MLP width, vocabulary) — see ``nps.lm.sharding``. On TPUs the devices are laid out by
    their physical torus (``mesh_utils``: neighbours on a mesh axis are neighbours on the chip
    interconnect); over several slices, ``data`` spans the slices (a multiple of their number),
    so that only the gradient sum crosses the data-centre network.
    """
    devices = list(jax.devices() if devices is None else devices)
    data = len(devices) // (fsdp * tensor) if data is None else data
    if min(data, fsdp, tensor) < 1 or data * fsdp * tensor > len(devices):
        raise ConfigError(
            f"mesh data={data} × fsdp={fsdp} × tensor={tensor} does not fit the {len(devices)} visible devices"
        )
    shape, devices = (data, fsdp, tensor), devices[: data * fsdp * tensor]
    slices = len({getattr(device, "slice_index", 0) for device in devices})
    if slices > 1:
        if data % slices:
            raise ConfigError(f"mesh data={data} must be a multiple of the {slices} slices the devices span")
        layout = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices)
    elif devices[0].platform == "tpu":
        layout = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        layout = np.asarray(devices).reshape(shape)
    return Mesh(layout, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (task) axis split over every batch axis of the mesh."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
    """How many parts a batch is split into: the product of the mesh's batch axes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_divisible(mesh: Mesh, batch_size: int, field: str = "train.batch_size") -> None:
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ConfigError(f"{field}={batch_size} must be divisible by the mesh's {shards} batch shards")
