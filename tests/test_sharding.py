"""Data-parallel training over a mesh of 8 simulated CPU devices equals one device."""

import os
import subprocess
import sys
import textwrap

import pytest

from nps.errors import ConfigError

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
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
    single, sharded = run(None), run(make_mesh(data=4, fsdp=2))
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4)  # reduction order differs across shards
    np.testing.assert_allclose([h["val_nll"] for h in single.history], [h["val_nll"] for h in sharded.history], rtol=1e-3)
    print("SHARDED-OK")
    """
)


def test_eight_device_mesh_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert "SHARDED-OK" in result.stdout, result.stderr[-3000:]


def test_batch_must_divide_over_the_mesh():
    import jax
    from jax.sharding import Mesh
    import numpy as np

    from nps.train.mesh import check_batch_divisible

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    check_batch_divisible(mesh, 7)
    fake = type("M", (), {"shape": {"data": 4, "fsdp": 2}})()
    with pytest.raises(ConfigError, match="train.batch_size=12 must be divisible by the mesh's 8 batch shards"):
        check_batch_divisible(fake, 12)
