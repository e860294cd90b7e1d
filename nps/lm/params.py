"""Where each ``Decoder`` parameter lives in a Hugging Face checkpoint: one table per family.

A row names a base weight three ways: its ``role`` (the short name that orders the
weights hash, see ``nps.lm.loading``), its path in the ``Decoder`` module tree, and
its transformers tensor name (``{layer}`` for per-block weights, stacked on the
leading layer axis in nps and one tensor per layer in the checkpoint). Loading and
exporting both read these tables, so a name is written once. Rows whose parameter
a model does not have (biases of a bias-free family, the LM head of tied
embeddings) are simply not used.
"""

from __future__ import annotations

from typing import NamedTuple


class TensorName(NamedTuple):
    role: str
    path: tuple[str, ...]
    hf: str


def _projection(role: str, group: str, hf_module: str) -> tuple[TensorName, TensorName]:
    """The weight and bias rows of one per-block projection."""
    hf = f"model.layers.{{layer}}.{hf_module}.{role}_proj"
    return (
        TensorName(role, ("blocks", group, role, "weight"), f"{hf}.weight"),
        TensorName(f"{role}_bias", ("blocks", group, role, "bias"), f"{hf}.bias"),
    )


# transformers' Llama naming, which Qwen2 and Gemma 1 share.
LLAMA_NAMES: tuple[TensorName, ...] = (
    TensorName("embed", ("embed",), "model.embed_tokens.weight"),
    TensorName("attn_norm", ("blocks", "attn_norm", "weight"), "model.layers.{layer}.input_layernorm.weight"),
    *(row for role in ("q", "k", "v", "o") for row in _projection(role, "attn", "self_attn")),
    TensorName("mlp_norm", ("blocks", "mlp_norm", "weight"), "model.layers.{layer}.post_attention_layernorm.weight"),
    *(row for role in ("gate", "up", "down") for row in _projection(role, "mlp", "mlp")),
    TensorName("final_norm", ("final_norm", "weight"), "model.norm.weight"),
    TensorName("lm_head", ("lm_head",), "lm_head.weight"),
)

HF_NAMES: dict[str, tuple[TensorName, ...]] = {
    "qwen2": LLAMA_NAMES,
    "llama": LLAMA_NAMES,
    "gemma": LLAMA_NAMES,
}


def tensor_names(model_type: str) -> dict[tuple[str, ...], TensorName]:
    """The family's rows by parameter path."""
    return {row.path: row for row in HF_NAMES[model_type]}


def is_stacked(row: TensorName) -> bool:
    """Per-block weights: one checkpoint tensor per layer, stacked on the layer axis in nps."""
    return "{layer}" in row.hf
