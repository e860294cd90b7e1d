"""Data-parallel training over a mesh of 8 simulated CPU devices equals one device."""

import pytest

from nps.errors import ConfigError


def test_eight_device_mesh_matches_one_device(run_script):
    run_script("tests/scripts/sharded_reward_fit.py", devices=8)


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
