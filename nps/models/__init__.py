"""Flax NNX models: reward models now; the decoder-LM family, LoRA and FiLM next."""

from nps.models.reward import (
    BTLReward,
    DPLReward,
    NPReward,
    RewardModelConfig,
    build_reward_model,
)

__all__ = ["BTLReward", "DPLReward", "NPReward", "RewardModelConfig", "build_reward_model"]
