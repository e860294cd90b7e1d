"""LoRA adapters on their own: merge into the base for export, save and load them as small files.

An adapter directory holds ``adapter.safetensors`` (the stacked A [L, r, in] and
B [L, out, r] of each target projection) and ``adapter_config.json`` (rank, alpha,
dropout, targets, and the base model's identity and weights hash). Loading refuses
adapters trained on different base weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.errors import NPSError
from nps.lm.decoder import Decoder, LoRAConfig
from nps.lm.loading import CheckpointFormatError, read_safetensors_header, read_tensor, write_safetensors

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = 1


def merge_lora(model: Decoder) -> None:
    """Fold each adapter into its base weight, W ← W + (α/r)·B·A, and drop the adapters (in place)."""
    if model.lora is None:
        return
    scale = model.lora_config.scale
    for name in model.lora_config.targets:
        a, b = getattr(model.lora, f"{name}_a")[...], getattr(model.lora, f"{name}_b")[...]
        base = getattr(model.blocks, name)
        delta = jnp.einsum("lor,lri->loi", b, a) * scale
        base[...] = (base[...].astype(jnp.float32) + delta).astype(base[...].dtype)
    model.lora, model.lora_config = nnx.data(None), None


def save_adapters(model: Decoder, directory: str | os.PathLike, *, base_identity: str, base_weights_hash: str) -> Path:
    """Write the model's LoRA adapters and their config (with the base's identity) to ``directory``."""
    if model.lora is None:
        raise NPSError("this model has no LoRA adapters to save; build it with lora=LoRAConfig(...)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = [(str(path[-1]), var[...]) for path, var in nnx.to_flat_state(nnx.state(model.lora, nnx.LoRAParam))]
    write_safetensors(directory / ADAPTER_WEIGHTS, sorted(tensors, key=lambda item: item[0]))
    lora = model.lora_config
    config = {
        "format": ADAPTER_FORMAT,
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "targets": list(lora.targets),
        "base_identity": base_identity,
        "base_weights_hash": base_weights_hash,
        "model_type": model.config.model_type,
    }
    partial = directory / (ADAPTER_CONFIG + ".partial")
    partial.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(partial, directory / ADAPTER_CONFIG)
    return directory


def load_adapters(model: Decoder, directory: str | os.PathLike, *, base_weights_hash: str | None = None) -> None:
    """Attach the adapters saved in ``directory`` to ``model`` (in place).

    base_weights_hash: the loaded base's ``Pretrained.weights_hash``; when given, adapters
    saved against other weights are refused.
    """
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.exists():
        raise CheckpointFormatError(f"{config_path}: missing; is {directory} an adapter directory?")
    try:
        saved = json.loads(config_path.read_text())
        lora = LoRAConfig(
            rank=int(saved["rank"]), alpha=float(saved["alpha"]), dropout=float(saved["dropout"]),
            targets=tuple(saved["targets"]),
        )
    except (ValueError, KeyError) as exc:
        raise CheckpointFormatError(f"{config_path}: unreadable adapter config ({exc!r}); re-save the adapters") from exc
    if base_weights_hash is not None and saved.get("base_weights_hash") != base_weights_hash:
        raise CheckpointFormatError(
            f"{config_path}: these adapters were trained on base {saved.get('base_identity')!r} "
            f"(weights hash {saved.get('base_weights_hash')}), not on the loaded base ({base_weights_hash}); "
            "load the matching base model"
        )
    tensors = read_safetensors_header(directory / ADAPTER_WEIGHTS)
    model.add_lora(lora, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model.lora, nnx.LoRAParam)):
        name = str(path[-1])
        if name not in tensors:
            raise CheckpointFormatError(f"{directory / ADAPTER_WEIGHTS}: tensor {name!r} is missing")
        if tensors[name].shape != var[...].shape:
            raise CheckpointFormatError(
                f"{directory / ADAPTER_WEIGHTS}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                f"the model needs {list(var[...].shape)} (a different base architecture?)"
            )
        var[...] = jnp.asarray(read_tensor(tensors[name]).astype(np.float32))
