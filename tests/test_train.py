"""Training loop: learning, best-checkpoint tracking, exact resume, corrupted checkpoints."""

import dataclasses

import chex
import numpy as np
import pytest
from small_task import MODEL, SPEC, TRAIN

from nps.config import config_from_dict
from nps.data.synthetic import two_user_pools
from nps.errors import CheckpointError, ConfigError
from nps.models.reward import RewardModelConfig, build_reward_model
from nps.train.checkpoint import CheckpointStore
from nps.train.loop import TrainConfig, fit


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


def test_bad_train_config_names_the_field():
    with pytest.raises(ConfigError, match="train.batch_size=0 must be a positive integer"):
        config_from_dict(TrainConfig, {"batch_size": 0}, "train")
    with pytest.raises(ConfigError, match="optimizer='sgd' is unknown; use 'adam' or 'adamw'"):
        TrainConfig(optimizer="sgd")


def test_steps_per_second_is_measured_without_compilation(pools):
    result = run(pools, model=dataclasses.replace(MODEL, hidden_dim=20))  # a shape compiled here first
    overall = TRAIN.steps / result.train_seconds  # the first chunk's compilation included
    assert result.steps_per_second > 1.5 * overall, (result.steps_per_second, overall)


def test_gradient_accumulation_gives_the_whole_batch_update(pools):
    """Micro-batches are equal slices of the batch: the averaged gradient is the batch gradient."""
    btl = RewardModelConfig(kind="btl", hidden_dim=32)  # no dropout: the model key is unused
    train = dataclasses.replace(TRAIN, steps=20, eval_every=10, checkpoint_every=10, schedule="cosine", warmup_steps=5)
    whole = run(pools, train=train, model=btl)
    accumulated = run(pools, train=dataclasses.replace(train, grad_accum_steps=4), model=btl)
    chex.assert_trees_all_close(whole.params, accumulated.params, atol=1e-6)
    with pytest.raises(ConfigError, match="grad_accum_steps=3 must be a positive divisor"):
        dataclasses.replace(train, grad_accum_steps=3)


def test_seeds_share_one_compiled_chunk_the_state_is_donated_and_each_chunk_syncs_once(pools, monkeypatch):
    """The jit boundary: a seed is data (three seeds, one compilation of the train chunk), the state a
    chunk replaces is donated, and the host reads each chunk's metrics with one explicit transfer."""
    import jax

    from nps.train import loop

    model = dataclasses.replace(MODEL, hidden_dim=24)  # a shape no other test compiles
    train = dataclasses.replace(TRAIN, steps=40)
    compiled_before = loop._train_chunk._cache_size()
    transfers = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: transfers.append(1) or device_get(tree))
    with jax.transfer_guard_device_to_host("disallow"):  # any implicit host sync in the loop raises
        results = [run(pools, model=model, train=dataclasses.replace(train, seed=seed)) for seed in (0, 1, 2)]
    assert loop._train_chunk._cache_size() - compiled_before == 1
    chunks = train.steps // train.eval_every
    assert len(transfers) == 3 * (chunks + 1)  # one per chunk, and one for the best step at the end
    assert not np.allclose(results[0].params["context_encoder"]["outer"]["out"]["kernel"],
                           results[1].params["context_encoder"]["outer"]["out"]["kernel"])

    state = loop._initial_state(results[0].params, optimizer=train.optimizer_config())
    spec_args = dict(graphdef=results[0].graphdef, spec=SPEC, optimizer=train.optimizer_config(), mesh=None)
    key = jax.random.key(0)
    new_state, _ = loop._train_chunk(state, {}, pools["train"], key, key, length=train.eval_every, **spec_args)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # donated: updated in place
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))
