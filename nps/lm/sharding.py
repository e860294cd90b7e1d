"""Logical axes -> mesh axes, for weights and activations alike: one table, ``RULES``.

Each weight carries the roles of its dimensions (logical axes) as its ``out_sharding``
metadata, set where the module creates it (``nps.lm.decoder``, ``nps.models.film``);
activations are constrained to logical axes where their layout matters (``constrain``: a
block's input and output, attention's heads, the MLP's width, the LM head's vocabulary, the
KV cache). ``RULES`` maps both to the mesh axes ("data", "fsdp", "tensor"):

- weights: the model dimension over fsdp (ZeRO-3: stored split, gathered one layer at a time
  for its matmuls), heads / MLP width / vocabulary over tensor (Megatron), layers never;
- activations: the batch over data × fsdp (each device its own sequences), heads / MLP width /
  vocabulary over tensor, the model dimension and the sequence whole.

Without the activation constraints XLA is free to follow the weights' layout and split
activations over the model dimension, and every device holds every sequence's activations
(``nps plan``: Qwen2.5-7B's NP-DPO step on 16 v5e chips, no remat, needed 347 GiB of
temporaries per chip without them, 40 GiB with them). A dimension that its mesh axes do not divide keeps the
longest prefix of them that does (whole at worst), so any mesh is valid for any model.
"""

from __future__ import annotations

import contextlib
import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

RULES: dict[str, tuple[str, ...]] = {
    # weights
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "layers": (),
    # A LoRA B's rank: split over fsdp, as A is by the model dimension it reads (ZeRO-3 for adapters).
    "lora_rank": ("fsdp",),
    # activations
    "activation_batch": ("data", "fsdp"),
    "activation_length": (),
    "activation_embed": (),
    "activation_heads": ("tensor",),
    "activation_kv_heads": ("tensor",),
    "activation_mlp": ("tensor",),
    "activation_vocab": ("tensor",),
    # The LM head inside a chunked loss (``Decoder.logits_function``): its vocabulary over the model
    # axes, the hidden states it reads over data alone.
    "head_vocab": ("tensor", "fsdp"),
    "head_batch": ("data",),
}
# The logical axes of the activations at a block boundary: [batch, sequence, model dimension].
HIDDEN = ("activation_batch", "activation_length", "activation_embed")


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> PartitionSpec:
    """The spec of an array with logical ``axes`` and ``shape`` on ``mesh`` (a ``Mesh`` or an
    ``AbstractMesh``). A mesh axis serves one dimension at most; axes of size 1 are skipped."""
    spec, used = [], set()
    for logical, size in zip(axes, shape, strict=True):
        chosen: list[str] = []
        for axis in RULES.get(logical, ()) if logical else ():
            count = mesh.shape.get(axis, 1)
            if count == 1 or axis in used:
                continue
            if size % (math.prod(mesh.shape[a] for a in chosen) * count):
                break
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def variable_sharding(var: nnx.Variable, mesh: Mesh | None) -> jax.sharding.Sharding | None:
    """Where a variable lives on ``mesh``, by its logical axes (None without a mesh: the default
    device). A variable without axes (the context encoder: small) is replicated."""
    if mesh is None:
        return None
    axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, partition_spec(tuple(axes), tuple(var.shape), mesh))


def shardings_of(state: nnx.State, mesh: Mesh) -> dict:
    """The pure-dict tree of shardings of an ``nnx.State`` (as ``nnx.to_pure_dict`` lays out its values)."""
    placed = jax.tree.map(lambda var: var.replace(variable_sharding(var, mesh)), state,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(placed)


def shard_decoder(model, mesh: Mesh, *filters) -> None:
    """Move the variables of a decoder (or a model holding one) that match ``filters`` (default:
    all) to their shardings on ``mesh``, in place."""
    for _, var in nnx.to_flat_state(nnx.state(model, *filters)):
        var[...] = jax.device_put(var[...], variable_sharding(var, mesh))


def on_mesh(mesh: Mesh | None):
    """The context in which ``constrain`` places activations on ``mesh``: entered inside a jitted
    function whose static arguments include the mesh (nothing without one)."""
    if mesh is None or mesh.size == 1:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """``x`` laid out by its logical ``axes`` on the mesh of the enclosing ``on_mesh`` (unchanged
    outside one, on one device, or inside ``shard_map``, where code is per device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or jax.sharding.AxisType.Manual in mesh.axis_types:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(axes, x.shape, mesh))


def mesh_of(tree) -> Mesh | None:
    """The mesh that a tree's arrays are laid out on (a model's weights, placed by
    ``from_pretrained(mesh=...)`` or ``shard_decoder``), or None when they live on one device."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None
