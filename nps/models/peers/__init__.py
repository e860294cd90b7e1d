"""Peer methods as nps preference models, each trainable by ``fit`` and evaluated like NP-BTL.

``PEER_MODELS[name] = (config class, model class)``; a model is built as
``model_class(option_dim, config, rngs=nnx.Rngs(seed))``.
"""

from nps.models.peers.lore import LoRe, LoReConfig
from nps.models.peers.pal import PALA, PALB, PALConfig

PEER_MODELS = {
    "pal-a": (PALConfig, PALA),
    "pal-b": (PALConfig, PALB),
    "lore": (LoReConfig, LoRe),
}
