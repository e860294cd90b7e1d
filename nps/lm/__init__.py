"""The decoder LM substrate: Qwen2/Qwen2.5, Llama 3.x and Gemma 1 in Flax NNX.

Loads Hugging Face checkpoints (``from_pretrained``), adds LoRA adapters, generates with a
KV cache, embeds texts by their last-token hidden state and trains next-token prediction.
Preference models built on it (FiLM conditioning, NP-DPO policies) live in ``nps.models``.
"""

from nps.lm.decoder import Decoder, DecoderConfig, KVCache, LoRAConfig
from nps.lm.generate import Generation, SamplingConfig, embed, embed_tokens, generate, generate_text
from nps.lm.loading import CheckpointFormatError, Pretrained, from_pretrained, save_pretrained

__all__ = [
    "CheckpointFormatError",
    "Decoder",
    "DecoderConfig",
    "Generation",
    "KVCache",
    "LoRAConfig",
    "Pretrained",
    "SamplingConfig",
    "embed",
    "embed_tokens",
    "from_pretrained",
    "generate",
    "generate_text",
    "save_pretrained",
]
