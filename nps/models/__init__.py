"""Preference models: reward models (BTL, DPL, NP-BTL) and steerable policies (NP-DPO, VPL-DPO, BTL-DPO).

Each implements the preference-model interface (``nps.models.interface``): ``objective(episodes,
key)`` and ``predict_log_odds(episodes, key)``; NP-BTL and the policies also ``context_latent(episodes)``
and ``target_log_odds(episodes, z)``, and the per-user reward models (NP-BTL, VPL, PAL, LoRe)
``reward(options, z)``. The decoder LM the policies build on is ``nps.lm``.
"""

from nps.models.film import ConditionedDecoder, FiLM
from nps.models.interface import (
    PerUserPreferenceModel,
    PerUserRewardModel,
    PreferenceModel,
    check_model,
    context_latents,
)
from nps.models.policy import PolicyConfig, SteerablePolicy, with_reference_log_probs
from nps.models.reward import (
    SYNTHETIC_NP_BTL,
    UF_NP_BTL,
    BTLReward,
    DPLReward,
    NPReward,
    RewardModelConfig,
    build_reward_model,
)

__all__ = [
    "SYNTHETIC_NP_BTL",
    "UF_NP_BTL",
    "BTLReward",
    "ConditionedDecoder",
    "DPLReward",
    "FiLM",
    "NPReward",
    "PerUserPreferenceModel",
    "PerUserRewardModel",
    "PolicyConfig",
    "PreferenceModel",
    "RewardModelConfig",
    "SteerablePolicy",
    "build_reward_model",
    "check_model",
    "context_latents",
    "with_reference_log_probs",
]
