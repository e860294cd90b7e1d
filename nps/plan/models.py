"""Decoder shapes to plan for: presets of well-known models, or any Hugging Face ``config.json``.

The presets are these models' own ``config.json`` fields (as published with their weights);
a plan needs the shapes only, never the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from nps.errors import ConfigError
from nps.lm.decoder import DecoderConfig

PRESETS = {
    "qwen2.5-0.5b": DecoderConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2.5-1.5b": DecoderConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2.5-7b": DecoderConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6),
    "llama-3.1-8b": DecoderConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_positions=8192, qkv_bias=False,
        max_position_embeddings=131072),
    "gemma-7b": DecoderConfig(
        model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_layers=28, num_heads=16,
        num_kv_heads=16, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0, qkv_bias=False,
        tie_word_embeddings=True, scale_embeddings=True, norm_weight_offset=True, activation="gelu_tanh",
        max_position_embeddings=8192),
}


def decoder_config(model: str) -> tuple[str, DecoderConfig]:
    """(a name for reports, the architecture) of a preset name, a ``config.json`` or a model folder."""
    if model.lower() in PRESETS:
        return model.lower(), PRESETS[model.lower()]
    path = Path(model)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ConfigError(f"--model={model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or a "
                          "model folder holding one")
    try:
        fields = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{config_file}: not a readable JSON config ({error}); fix or replace it") from None
    return str(path), DecoderConfig.from_hf(fields, source=str(config_file))
