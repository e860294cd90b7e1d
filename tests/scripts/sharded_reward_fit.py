"""Data-parallel reward-model training on a (data 4, fsdp 2) mesh equals one device.

Run by tests/test_sharding.py on 8 simulated CPU devices.
"""

import jax
import numpy as np

from nps.data.episodes import EpisodeSpec
from nps.data.synthetic import two_user_pools
from nps.encoder import EncoderConfig
from nps.models.reward import RewardModelConfig, build_reward_model
from nps.train.loop import TrainConfig, fit
from nps.train.mesh import make_mesh

assert jax.device_count() == 8, jax.devices()
pools = two_user_pools(num_pairs=1000, seed=0)
spec = EpisodeSpec(num_targets=8, max_context=4)
config = RewardModelConfig(kind="np", hidden_dim=32, encoder=EncoderConfig(hidden_dim=32, latent_dim=16))
train = TrainConfig(steps=20, batch_size=16, eval_every=10, val_tasks=32, learning_rate=1e-3)


def run(mesh):
    return fit(build_reward_model(1, config, 0), pools["train"], pools["val"], spec, train, progress=False, mesh=mesh)


single, sharded = run(make_mesh(data=1)), run(make_mesh(data=4, fsdp=2))  # one device against eight
for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)  # reduction order differs across shards
np.testing.assert_allclose([h["val_nll"] for h in single.history], [h["val_nll"] for h in sharded.history], rtol=1e-3)
