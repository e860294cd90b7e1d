"""LoRA adapters on their own: merge into the base for export, save and load them as small files.

An adapter directory holds ``adapter.safetensors`` (the stacked A [L, r, in] and
B [L, out, r] of each target projection, named ``<target>_a`` and ``<target>_b``) and
``adapter_config.json`` (rank, alpha, dropout, targets, and the base model's identity
and weights hash). Loading checks both files completely before the model is touched
and refuses adapters trained on different base weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from nps.errors import ConfigError, NPSError
from nps.files import atomic_write_json
from nps.lm.decoder import Decoder, LoRAConfig
from nps.lm.loading import (CheckpointFormatError, read_json, read_safetensors_header, read_tensor,
                            write_safetensors)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = 1


def merge_lora(model: Decoder) -> None:
    """Fold each adapter into its base weight, W ← W + (α/r)·B·A, and drop the adapters (in place)."""
    if model.lora_config is None:
        return
    for linear in model.projections().values():
        if linear.lora is not None:
            delta = jnp.einsum("lor,lri->loi", linear.lora.b[...], linear.lora.a[...]) * linear.lora.scale
            weight = linear.weight[...]
            linear.weight[...] = (weight.astype(jnp.float32) + delta).astype(weight.dtype)
    model.remove_lora()


def _adapter_tensors(model: Decoder) -> list[tuple[str, jnp.ndarray]]:
    """(file name, stacked array) of every adapter matrix, in the file's naming."""
    return [
        (f"{name}_{matrix}", getattr(linear.lora, matrix))
        for name, linear in model.projections().items()
        if linear.lora is not None
        for matrix in ("a", "b")
    ]


def save_adapters(model: Decoder, directory: str | os.PathLike, *, base_identity: str, base_weights_hash: str) -> Path:
    """Write the model's LoRA adapters and their config (with the base's identity) to ``directory``."""
    if model.lora_config is None:
        raise NPSError("this model has no LoRA adapters to save; build it with lora=LoRAConfig(...)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = [(name, var[...]) for name, var in _adapter_tensors(model)]
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
    atomic_write_json(directory / ADAPTER_CONFIG, config)
    return directory


def read_adapter_config(path: Path) -> tuple[LoRAConfig, dict]:
    """The adapters' ``LoRAConfig`` and the saved fields, every field's type and range checked."""
    saved = read_json(path, f"is {path.parent} an adapter directory?")
    fix = "; re-save the adapters"
    if not isinstance(saved, dict):
        raise CheckpointFormatError(f"{path}: must hold a JSON object, not a {type(saved).__name__}{fix}")
    if saved.get("format", ADAPTER_FORMAT) != ADAPTER_FORMAT:
        raise CheckpointFormatError(f"{path}: format={saved['format']!r}; this nps reads format {ADAPTER_FORMAT}")
    missing = [key for key in ("rank", "alpha", "dropout", "targets") if key not in saved]
    if missing:
        raise CheckpointFormatError(f"{path}: field {missing[0]!r} is missing{fix}")
    targets = saved["targets"]
    try:
        lora = LoRAConfig(rank=saved["rank"], alpha=saved["alpha"], dropout=saved["dropout"],
                          targets=tuple(targets) if isinstance(targets, list) else targets)
    except ConfigError as error:
        raise CheckpointFormatError(f"{path}: {error}{fix}") from None
    return lora, saved


def load_adapters(model: Decoder, directory: str | os.PathLike, *, base_weights_hash: str | None = None) -> None:
    """Attach the adapters saved in ``directory`` to ``model`` (in place).

    base_weights_hash: the loaded base's ``Pretrained.weights_hash``; when given, adapters
    saved against other weights are refused. Nothing changes in ``model`` unless both
    files are complete and fit it.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    lora, saved = read_adapter_config(config_path)
    if base_weights_hash is not None and saved.get("base_weights_hash") != base_weights_hash:
        raise CheckpointFormatError(
            f"{config_path}: these adapters were trained on base {saved.get('base_identity')!r} "
            f"(weights hash {saved.get('base_weights_hash')}), not on the loaded base ({base_weights_hash}); "
            "load the matching base model"
        )
    tensors = read_safetensors_header(weights_path)
    for target in lora.targets:
        layers, out_dim, in_dim = model.projections()[target].weight.shape
        expected = {f"{target}_a": (layers, lora.rank, in_dim), f"{target}_b": (layers, out_dim, lora.rank)}
        for name, shape in expected.items():
            if name not in tensors:
                raise CheckpointFormatError(
                    f"{weights_path}: tensor {name!r} is missing (targets {list(lora.targets)})")
            if tensors[name].shape != shape:
                raise CheckpointFormatError(
                    f"{weights_path}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                    f"the model needs {list(shape)} (a different base architecture?)"
                )
    model.add_lora(lora, rngs=nnx.Rngs(0))
    for name, var in _adapter_tensors(model):
        var[...] = jnp.asarray(read_tensor(tensors[name]), jnp.float32)
