"""Partition specs for decoder weights over a ("data", "fsdp", "tensor") mesh.

Each base weight is named by its dimensions' roles (logical axes); the roles map to
mesh axes: the model dimension is split over "fsdp" (ZeRO-3 style: gathered for the
matmul, stored split), heads / MLP width / vocabulary over "tensor" (Megatron
style). A dimension that a mesh axis does not divide stays whole, so any mesh is
valid for any model. LoRA and FiLM weights are small and replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

# Logical axes of every base weight (per-block weights lead with the unsplit layer axis).
LOGICAL_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("vocab", "embed"),
    "final_norm": (None,),
    "attn_norm": (None, None),
    "mlp_norm": (None, None),
    "q": (None, "heads", "embed"),
    "k": (None, "heads", "embed"),
    "v": (None, "heads", "embed"),
    "o": (None, "embed", "heads"),
    "gate": (None, "mlp", "embed"),
    "up": (None, "mlp", "embed"),
    "down": (None, "embed", "mlp"),
    "q_bias": (None, "heads"),
    "k_bias": (None, "heads"),
    "v_bias": (None, "heads"),
    "o_bias": (None, None),
    "gate_bias": (None, "mlp"),
    "up_bias": (None, "mlp"),
    "down_bias": (None, None),
}


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The spec of base weight ``name`` with ``shape`` on ``mesh`` (unknown names: replicated)."""
    axes = []
    for logical, size in zip(LOGICAL_AXES.get(name, (None,) * len(shape)), shape):
        mesh_axis = LOGICAL_TO_MESH.get(logical)
        if mesh_axis in mesh.shape and mesh.shape[mesh_axis] > 1 and size % mesh.shape[mesh_axis] == 0:
            axes.append(mesh_axis)
        else:
            axes.append(None)
    return PartitionSpec(*axes)


def param_sharding(name: str, shape: tuple[int, ...], mesh: Mesh | None) -> jax.sharding.Sharding:
    """Where weight ``name`` lives: its spec on ``mesh``, or the default device without one."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own
    return NamedSharding(mesh, partition_spec(name, shape, mesh))


def shard_decoder(model, mesh: Mesh) -> None:
    """Move every variable of a decoder (base, LoRA, FiLM) to its sharding on ``mesh`` in place."""
    from flax import nnx

    for path, var in nnx.to_flat_state(nnx.state(model)):
        var[...] = jax.device_put(var[...], param_sharding(str(path[-1]), var[...].shape, mesh))
