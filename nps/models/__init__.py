"""Flax NNX models: the reward models (BTL, DPL, NP-BTL) and the decoder-LM family.

Decoder LMs (Qwen2/Qwen2.5, Llama 3.x, Gemma 1) load Hugging Face checkpoints with
``from_pretrained``, take LoRA adapters and FiLM conditioning on a user latent z,
generate with a KV cache and embed texts by their last-token hidden state.
"""

from nps.models.decoder import BaseParam, Decoder, DecoderConfig, KVCache, LoRAConfig
from nps.models.film import FiLM, ConditionedDecoder
from nps.models.generate import Generation, SamplingConfig, embed, generate, generate_text
from nps.models.loading import CheckpointFormatError, Pretrained, from_pretrained
from nps.models.reward import (
    BTLReward,
    DPLReward,
    NPReward,
    RewardModelConfig,
    build_reward_model,
)

__all__ = [
    "BTLReward",
    "BaseParam",
    "CheckpointFormatError",
    "ConditionedDecoder",
    "DPLReward",
    "Decoder",
    "DecoderConfig",
    "FiLM",
    "Generation",
    "KVCache",
    "LoRAConfig",
    "NPReward",
    "Pretrained",
    "RewardModelConfig",
    "SamplingConfig",
    "build_reward_model",
    "embed",
    "from_pretrained",
    "generate",
    "generate_text",
]
