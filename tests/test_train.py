"""Training loop: learning, best-checkpoint tracking, exact resume, corrupted checkpoints."""

import dataclasses

import chex
import numpy as np
import pytest

from nps.config import config_from_dict
from nps.data.episodes import EpisodeSpec
from nps.data.synthetic import two_user_pools
from nps.encoder import EncoderConfig
from nps.errors import CheckpointError, ConfigError
from nps.models.reward import RewardModelConfig, build_reward_model
from nps.train.checkpoint import CheckpointStore
from nps.train.loop import TrainConfig, fit

SPEC = EpisodeSpec(num_targets=8, max_context=4)
MODEL = RewardModelConfig(kind="np", hidden_dim=32, encoder=EncoderConfig(hidden_dim=32, latent_dim=16))
TRAIN = TrainConfig(steps=60, batch_size=16, learning_rate=3e-3, eval_every=20, checkpoint_every=20, val_tasks=64)


@pytest.fixture(scope="module")
def pools():
    return two_user_pools(num_pairs=2000, seed=1)


def run(pools, directory=None, train=TRAIN, model=MODEL, **kwargs):
    return fit(build_reward_model(1, model, 0), pools["train"], pools["val"], SPEC, train, directory,
               progress=False, **kwargs)


def test_training_lowers_the_validation_loss_and_keeps_the_best(pools):
    result = run(pools)
    losses = [h["val_nll"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best_val_loss == pytest.approx(min(losses))
    assert result.best_step == result.history[int(np.argmin(losses))]["step"]
    assert [h["step"] for h in result.history] == [20, 40, 60]


def test_resumed_run_matches_an_uninterrupted_one(pools, tmp_path):
    straight = run(pools, tmp_path / "straight")
    run(pools, tmp_path / "resumed", train=TrainConfig(**{**TRAIN.__dict__, "steps": 40}))
    resumed = run(pools, tmp_path / "resumed")
    chex.assert_trees_all_equal(straight.params, resumed.params)
    assert straight.history == resumed.history
    # Re-running a finished run trains nothing and returns the same result.
    again = run(pools, tmp_path / "resumed")
    chex.assert_trees_all_equal(again.params, straight.params)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(pools, tmp_path):
    run(pools, tmp_path)
    store = CheckpointStore(tmp_path)
    assert store.steps() == [40, 60]
    for path in (tmp_path / "60").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="checkpoint step 60 .* is corrupted"):
        resumed = run(pools, tmp_path)
    assert [h["step"] for h in resumed.history] == [20, 40, 60]
    chex.assert_trees_all_equal(resumed.params, run(pools).params)
    assert (tmp_path.parent / f"{tmp_path.name}.corrupt" / "60").exists()


def test_all_checkpoints_corrupted_is_a_clear_error(pools, tmp_path):
    run(pools, tmp_path, train=TrainConfig(**{**TRAIN.__dict__, "steps": 20}))
    for path in tmp_path.rglob("*"):
        if path.is_file() and "20" in path.parts:
            path.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no readable checkpoint"):
        run(pools, tmp_path)


def test_checkpoints_of_another_configuration_are_refused(pools, tmp_path):
    run(pools, tmp_path, train=TrainConfig(**{**TRAIN.__dict__, "steps": 20}), run_config={"model": "a"})
    with pytest.raises(CheckpointError, match="different configuration .*model"):
        run(pools, tmp_path, run_config={"model": "b"})


def test_variational_np_trains_and_predicts_finitely(pools):
    model = RewardModelConfig(kind="np", hidden_dim=32, encoder=EncoderConfig(hidden_dim=32, latent_dim=16, stochastic=True),
                              train_latent_samples=2, eval_latent_samples=4)
    result = run(pools, model=model, train=TrainConfig(**{**TRAIN.__dict__, "steps": 20}))
    assert np.isfinite(result.best_val_loss)
    assert np.isfinite(result.history[-1]["train_loss"])


def test_bad_train_config_names_the_field():
    with pytest.raises(ConfigError, match="train.batch_size=0 must be a positive integer"):
        config_from_dict(TrainConfig, {"batch_size": 0}, "train")
    with pytest.raises(ConfigError, match="optimizer='sgd' is unknown; use 'adam' or 'adamw'"):
        TrainConfig(optimizer="sgd")


def test_steps_per_second_is_measured_without_compilation(pools):
    result = run(pools)
    assert result.steps_per_second > 0 and np.isfinite(result.steps_per_second)


def test_gradient_accumulation_gives_the_whole_batch_update(pools):
    """Micro-batches are equal slices of the batch: the averaged gradient is the batch gradient."""
    btl = RewardModelConfig(kind="btl", hidden_dim=32)  # no dropout: the model key is unused
    train = dataclasses.replace(TRAIN, steps=20, eval_every=10, checkpoint_every=10, schedule="cosine", warmup_steps=5)
    whole = run(pools, train=train, model=btl)
    accumulated = run(pools, train=dataclasses.replace(train, grad_accum_steps=4), model=btl)
    chex.assert_trees_all_close(whole.params, accumulated.params, atol=1e-6)
    with pytest.raises(ConfigError, match="grad_accum_steps=3 must be a positive divisor"):
        dataclasses.replace(train, grad_accum_steps=3)
