"""The small synthetic task the training-loop tests share: a tiny NP-BTL, 60 steps in chunks of 20."""

from nps.data.episodes import EpisodeSpec
from nps.encoder import EncoderConfig
from nps.models.reward import RewardModelConfig
from nps.train.loop import TrainConfig

SPEC = EpisodeSpec(num_targets=8, max_context=4)
MODEL = RewardModelConfig(kind="np", hidden_dim=32, encoder=EncoderConfig(hidden_dim=32, latent_dim=16))
TRAIN = TrainConfig(steps=60, batch_size=16, learning_rate=3e-3, eval_every=20, checkpoint_every=20, val_tasks=64)
