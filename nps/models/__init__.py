"""Preference models: reward models (BTL, DPL, NP-BTL) and steerable policies (NP-DPO, BTL-DPO).

They share one interface with ``nps.train.fit``: ``objective(episodes, key)`` and
``predict_log_odds(episodes, key)``. The decoder LM they build on is ``nps.lm``.
"""

from nps.models.film import ConditionedDecoder, FiLM
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
    "PolicyConfig",
    "RewardModelConfig",
    "SteerablePolicy",
    "build_reward_model",
    "with_reference_log_probs",
]
