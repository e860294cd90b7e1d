"""The preference-model interface (nps.models.interface): models declare it, a model without a method
is refused in one line naming it, and every public function takes BTL, DPL and NP-BTL the one way
(the model itself), with the numbers of a direct computation on the same tasks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nps.active import answer_curves, informative_chooser, particle_choice_probabilities, particle_latents
from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.pairs import answer_pairs
from nps.data.synthetic import two_user_pools
from nps.encoder import EncoderConfig
from nps.likelihood import choice_accuracy
from nps.models import (
    BTLReward,
    DPLReward,
    NPReward,
    PerUserPreferenceModel,
    PreferenceModel,
    RewardModelConfig,
    SteerablePolicy,
    build_reward_model,
    check_model,
    context_latents,
)
from nps.train.evaluate import _unseen_accuracy, evaluate_unseen_accuracy, identification_errors, rewards_given_context
from nps.train.loop import TrainConfig, fit
from nps.workflow.consistency import check_profile, drift_test, leave_one_out

SPEC = EpisodeSpec(num_targets=8, max_context=4)
KINDS = ("btl", "dpl", "np")
USERS = ["z=0", "z=1"]


def small(kind: str, seed: int = 0) -> PreferenceModel:
    config = RewardModelConfig(kind=kind, hidden_dim=16, encoder=EncoderConfig(hidden_dim=16, latent_dim=8))
    return build_reward_model(1, config, seed)


@pytest.fixture(scope="module")
def pools():
    return two_user_pools(num_pairs=500, seed=3)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# -- declaring and checking -------------------------------------------------------------------------
def test_the_models_declare_the_interface_they_implement():
    for model_class in (BTLReward, DPLReward):
        assert issubclass(model_class, PreferenceModel) and not issubclass(model_class, PerUserPreferenceModel)
    for model_class in (NPReward, SteerablePolicy):
        assert issubclass(model_class, PerUserPreferenceModel)
    for kind in KINDS:
        check_model(small(kind))
    check_model(small("np"), PerUserPreferenceModel)


def test_a_declared_model_without_a_method_cannot_be_built():
    class NoTargets(PerUserPreferenceModel):
        def objective(self, episodes, key):
            return 0.0, {}

        def context_latent(self, episodes):
            return episodes.context_mask.astype(float)

    with pytest.raises(TypeError) as error:
        NoTargets()
    assert "target_log_odds" in one_line(error)


class Undeclared(nnx.Module):
    """A module that predicts but never says how it trains."""

    def __init__(self):
        self.scale = nnx.Param(jnp.ones(()))

    def predict_log_odds(self, episodes, key=None):
        return self.scale[...] * (episodes.target_chosen - episodes.target_rejected)[..., 0]


def test_a_function_refuses_an_object_without_a_method_in_one_line_naming_it(pools):
    with pytest.raises(TypeError) as error:
        fit(Undeclared(), pools["train"], pools["val"], SPEC, TrainConfig(steps=1), progress=False)
    assert one_line(error).startswith("Undeclared is not a PreferenceModel: it has no objective() method")
    with pytest.raises(TypeError) as error:
        evaluate_unseen_accuracy(Undeclared(), pools["test"], SPEC, USERS, num_tasks=4)
    assert "no objective() method" in one_line(error)


@pytest.mark.parametrize("kind", ["btl", "dpl"])
def test_the_per_user_functions_refuse_a_model_without_a_user_state_in_one_line(pools, kind):
    model = small(kind)
    option = jnp.zeros((3, 1))
    answered = answer_pairs(pools["test"].take(np.arange(6)), jax.nn.one_hot(jnp.arange(2), 2), jax.random.key(0))
    calls = {
        "particle_latents": lambda: particle_latents(model, pools["val"], SPEC, 4, 2, jax.random.key(0)),
        "particle_choice_probabilities": lambda: particle_choice_probabilities(model, jnp.zeros((2, 8)), option,
                                                                               option),
        "informative_chooser": lambda: informative_chooser(model, jnp.zeros((2, 8)), option, option),
        "answer_curves": lambda: answer_curves(model, answered, answered, jnp.zeros((2, 8)), "random", 2,
                                               jax.random.key(0)),
        "leave_one_out": lambda: leave_one_out(model, option, option, trained_context=4),
        "drift_test": lambda: drift_test(model, option, option),
        "check_profile": lambda: check_profile(model, [], None, None, trained_context=4),
        "context_latents": lambda: context_latents(model, option[None], option[None], jnp.ones((1, 3), bool)),
        "rewards_given_context": lambda: rewards_given_context(model, pools["test"], SPEC, option, 2,
                                                               jax.random.key(0)),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError) as error:
            call()
        interface = "PerUserRewardModel" if name == "rewards_given_context" else "PerUserPreferenceModel"
        assert one_line(error) == (f"{type(model).__name__} is not a {interface}: it has no "
                                   "context_latent() method; implement it (see nps.models.interface)"), name


def test_a_per_user_model_without_a_reward_per_option_is_refused_where_rewards_are_read():
    """NP-BTL, VPL, PAL and LoRe are per-user reward models; a per-user model with no ``reward(options, z)``
    (NP-DPO's policy, a duck-typed model) is refused by the reward plots and scorers, naming the method."""
    from types import SimpleNamespace

    from nps.models.interface import PerUserRewardModel, interface_methods
    from nps.models.peers import LoRe, PALA, PALB, VPLReward
    from nps.models.policy import SteerablePolicy
    from nps.models.reward import NPReward

    assert interface_methods(PerUserRewardModel) == ("objective", "predict_log_odds", "context_latent",
                                                     "target_log_odds", "reward")
    assert all(issubclass(cls, PerUserRewardModel) for cls in (NPReward, VPLReward, PALA, PALB, LoRe))
    assert not issubclass(SteerablePolicy, PerUserRewardModel)
    per_user_only = SimpleNamespace(**{name: lambda *_: None for name in interface_methods(PerUserRewardModel)[:-1]})
    with pytest.raises(TypeError, match=r"^SimpleNamespace is not a PerUserRewardModel: it has no reward\(\) method"):
        check_model(per_user_only, PerUserRewardModel)


# -- one convention: the model itself ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_the_unseen_accuracy_of_any_model_is_its_own_prediction_on_the_same_tasks(pools, kind):
    model = small(kind)
    accuracy = evaluate_unseen_accuracy(model, pools["test"], SPEC, USERS, context_sizes=(0, 3), num_tasks=16, seed=5)
    key = jax.random.fold_in(jax.random.key(5), 0)
    predict = jax.jit(lambda episodes: model.predict_log_odds(episodes, jax.random.fold_in(key, 1)))
    for size in (0, 3):
        episodes = sample_episodes(key, pools["test"], SPEC.for_context(3), 16, size)
        direct = choice_accuracy(predict(episodes), episodes.unseen_mask)
        np.testing.assert_allclose(accuracy[str(size)]["all"]["mean"], float(jnp.mean(direct)), rtol=1e-6)


def test_models_of_one_structure_share_the_compiled_evaluation(pools):
    evaluate_unseen_accuracy(small("np", seed=0), pools["test"], SPEC, USERS, context_sizes=(1,), num_tasks=8)
    compiled = _unseen_accuracy._cache_size()
    evaluate_unseen_accuracy(small("np", seed=1), pools["test"], SPEC, USERS, context_sizes=(1,), num_tasks=8)
    assert _unseen_accuracy._cache_size() == compiled


@pytest.mark.parametrize("kind", KINDS)
def test_identification_errors_take_any_model(pools, kind):
    probe = jnp.linspace(0.0, 1.0, 8)[:, None]
    z_errors, pair_errors = identification_errors(small(kind), pools["test"], probe, probe[::-1], SPEC, 6, 4,
                                                  jax.random.key(0))
    chex.assert_shape((z_errors, pair_errors), (6,))
    assert set(np.unique(z_errors)) <= {0.0, 1.0} and np.all((pair_errors >= 0) & (pair_errors <= 1))


def test_the_per_user_functions_are_the_models_own_latents_and_log_odds(pools):
    model = small("np")
    key = jax.random.key(2)
    particles = particle_latents(model, pools["val"], SPEC, 5, 3, key)
    episodes = sample_episodes(key, pools["val"], SPEC.for_context(3), 5, 3)
    latent = jax.jit(lambda e: model.context_latent(e))
    chex.assert_trees_all_close(particles, latent(episodes), rtol=1e-6)
    chex.assert_trees_all_close(
        context_latents(model, episodes.context_chosen, episodes.context_rejected, episodes.context_mask),
        latent(episodes), rtol=1e-6)
    a, b = jnp.linspace(0.0, 1.0, 7)[:, None], jnp.linspace(1.0, 0.0, 7)[:, None]
    probabilities = particle_choice_probabilities(model, particles, a, b)
    targets = episodes._replace(target_chosen=jnp.broadcast_to(a, (5, 7, 1)),
                                target_rejected=jnp.broadcast_to(b, (5, 7, 1)), target_mask=jnp.ones((5, 7), bool))
    chex.assert_trees_all_close(probabilities, jax.nn.sigmoid(model.target_log_odds(targets, particles)), rtol=1e-5)
    answered = answer_pairs(pools["test"].take(np.arange(10)), jax.nn.one_hot(jnp.arange(4) % 2, 2), key)
    accuracy, asked = answer_curves(model, answered, answered, particles, "active", 3, key)
    chex.assert_shape((accuracy, asked), ((4, 4), (4, 3)))
    chosen = episodes.context_chosen[0, :3]
    probabilities = leave_one_out(model, chosen, episodes.context_rejected[0, :3], trained_context=SPEC.max_context)
    assert probabilities.shape == (3,) and np.all((probabilities > 0) & (probabilities < 1))
