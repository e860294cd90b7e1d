"""Partition specs for decoder weights over a ("data", "fsdp", "tensor") mesh.

Each weight carries the roles of its dimensions (logical axes) as its ``out_sharding``
metadata, set where the module creates it (``nps.lm.decoder``); the roles map to mesh
axes here: the model dimension is split over "fsdp" (ZeRO-3 style: gathered for the
matmul, stored split), heads / MLP width / vocabulary over "tensor" (Megatron style),
the stacked layer axis never. A dimension that a mesh axis does not divide stays
whole, so any mesh is valid for any model. Variables without axes (LoRA, FiLM: small)
are replicated.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The spec of a weight with logical ``axes`` and ``shape`` on ``mesh``."""
    spec = []
    for logical, size in zip(axes, shape, strict=True):
        mesh_axis = LOGICAL_TO_MESH.get(logical)
        divides = mesh_axis in mesh.shape and mesh.shape[mesh_axis] > 1 and size % mesh.shape[mesh_axis] == 0
        spec.append(mesh_axis if divides else None)
    return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh | None) -> jax.sharding.Sharding | None:
    """Where a variable lives on ``mesh``, by its logical axes (None without a mesh: the default device)."""
    if mesh is None:
        return None
    axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, partition_spec(tuple(axes), tuple(var.shape), mesh))


def shard_decoder(model, mesh: Mesh, *filters) -> None:
    """Move the variables of a decoder (or a model holding one) that match ``filters`` (default:
    all) to their shardings on ``mesh``, in place."""
    for _, var in nnx.to_flat_state(nnx.state(model, *filters)):
        var[...] = jax.device_put(var[...], variable_sharding(var, mesh))
