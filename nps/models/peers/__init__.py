"""Peer methods as nps preference models, each behind the interface ``fit`` and the unseen-target
evaluation use (``objective``, ``predict_log_odds``; ``context_latent`` and ``target_log_odds`` where the
method has a per-user latent), built by ``nps.models.reward.build_reward_model`` from their configs.

``PEER_MODELS``: kind -> (config class, model class); a model is built as
``model_class(option_dim, config, rngs=nnx.Rngs(seed))``. What each does and how it differs from its
release: docs/peers.md.
"""

import dataclasses

from nps.models.peers.gpo import GPOConfig, GPOReward
from nps.models.peers.lore import LoRe, LoReConfig
from nps.models.peers.pal import PALA, PALB, PALConfig
from nps.models.peers.vpl import VPLConfig, VPLReward

PEER_MODELS = {
    "vpl": (VPLConfig, VPLReward),
    "gpo": (GPOConfig, GPOReward),
    "pal-a": (PALConfig, PALA),
    "pal-b": (PALConfig, PALB),
    "lore": (LoReConfig, LoRe),
}


def told_the_run(model_config, num_users: int, learning_rate: float):
    """``model_config`` with the task's number of user types and the run's learning rate, where it has a
    field for them (PAL's and LoRe's user tables, PAL's rates relative to ``fit``'s)."""
    fields = {field.name for field in dataclasses.fields(model_config)}
    run = {"num_users": num_users, "train_learning_rate": learning_rate}
    return dataclasses.replace(model_config, **{name: value for name, value in run.items() if name in fields})


__all__ = ["PEER_MODELS", "GPOConfig", "GPOReward", "LoRe", "LoReConfig", "PALA", "PALB", "PALConfig", "VPLConfig",
           "VPLReward", "told_the_run"]
