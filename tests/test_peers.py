"""VPL and GPO as nps reward models: their defining maths against direct computations, their empty-context
rules, invariance to the context's order, and predictions that never read a target's label."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy.stats import norm

from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.synthetic import two_user_pools
from nps.errors import ConfigError
from nps.latent import DiagonalGaussian, gaussian_kl
from nps.models.peers import PEER_MODELS, GPOConfig, VPLConfig
from nps.models.peers.gpo import gaussian_nll_of_choices, gpo_key_mask
from nps.models.peers.vpl import active_latent_units, kl_annealing, sphere_projection, standard_normal_kl
from nps.models.reward import build_reward_model
from nps.train.loop import _episode_loss

SPEC = EpisodeSpec(num_targets=8, max_context=5, min_context=1)
SMALL = {"vpl": VPLConfig(hidden_dim=16, latent_dim=8), "gpo": GPOConfig(model_dim=16, num_layers=2,
                                                                          feedforward_dim=16)}


@pytest.fixture(scope="module")
def episodes():
    pool = two_user_pools(num_pairs=500, seed=2)["train"]
    return sample_episodes(jax.random.key(0), pool, SPEC, 6)


@pytest.fixture(scope="module", params=sorted(SMALL))
def model(request):
    return build_reward_model(1, SMALL[request.param], 0)


def _permuted_context(episodes, permutation):
    return episodes._replace(context_chosen=episodes.context_chosen[:, permutation],
                             context_rejected=episodes.context_rejected[:, permutation],
                             context_mask=episodes.context_mask[:, permutation])


def test_every_peer_is_registered_and_built_by_its_config():
    for kind, (config_class, model_class) in PEER_MODELS.items():
        config = SMALL.get(kind, config_class(kind=kind))  # PALConfig serves "pal-a" and "pal-b"
        assert config.kind == kind
        assert isinstance(build_reward_model(1, config, 0), model_class)
    with pytest.raises(ConfigError, match="kind"):
        VPLConfig(kind="gpo")
    with pytest.raises(ConfigError, match="loss"):
        GPOConfig(loss="mse")


def test_predictions_do_not_depend_on_the_order_of_context_pairs(model, episodes):
    permutation = jnp.array([3, 0, 4, 2, 1])
    chex.assert_trees_all_close(model.predict_log_odds(_permuted_context(episodes, permutation)),
                                model.predict_log_odds(episodes), rtol=1e-5, atol=1e-5)


def test_padding_is_never_read(model, episodes):
    junk = jnp.where(episodes.context_mask[..., None], episodes.context_chosen, jnp.nan)
    chex.assert_trees_all_close(model.predict_log_odds(episodes._replace(context_chosen=junk)),
                                model.predict_log_odds(episodes))


def test_predictions_never_read_a_target_label(model, episodes):
    """Swapping the options of the unseen targets negates their log-odds and changes nothing else:
    the evaluation's targets are scored without their labels."""
    unseen = episodes.unseen_mask[..., None]
    swapped = episodes._replace(target_chosen=jnp.where(unseen, episodes.target_rejected, episodes.target_chosen),
                                target_rejected=jnp.where(unseen, episodes.target_chosen, episodes.target_rejected))
    original, after = model.predict_log_odds(episodes), model.predict_log_odds(swapped)
    assert bool(jnp.any(episodes.unseen_mask))
    np.testing.assert_allclose(after, jnp.where(episodes.unseen_mask, -original, original), rtol=1e-5, atol=1e-5)


def test_the_empty_context_gives_finite_predictions_that_ignore_the_padding(model, episodes):
    empty = episodes._replace(context_mask=jnp.zeros_like(episodes.context_mask))
    other = empty._replace(context_chosen=episodes.context_chosen + 3.0)
    log_odds = model.predict_log_odds(empty)
    assert bool(jnp.all(jnp.isfinite(log_odds)))
    np.testing.assert_allclose(model.predict_log_odds(other), log_odds)


# -- VPL -------------------------------------------------------------------------------------------
def test_vpl_empty_context_is_the_prior(episodes):
    model = build_reward_model(1, SMALL["vpl"], 0)
    empty = episodes._replace(context_mask=jnp.zeros_like(episodes.context_mask))
    mean, log_var = model.posterior(empty)
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(log_var, 0.0)
    np.testing.assert_allclose(model.predict_log_odds(empty), model.target_log_odds(empty, jnp.zeros_like(mean)))
    _, aux = model.objective(empty, jax.random.key(0), step=jnp.int32(0))
    assert float(aux["kl"]) == 0.0


def test_vpl_kl_is_the_gaussian_kl_to_the_standard_normal():
    mean = jax.random.normal(jax.random.key(1), (4, 8))
    log_var = jax.random.uniform(jax.random.key(2), (4, 8), minval=-1.0, maxval=1.0)
    direct = gaussian_kl(DiagonalGaussian(mean, jnp.exp(0.5 * log_var)),
                         DiagonalGaussian(jnp.zeros_like(mean), jnp.ones_like(mean)))
    np.testing.assert_allclose(standard_normal_kl(mean, log_var), direct, rtol=1e-5)


def test_vpl_annealing_is_the_release_cyclical_cosine():
    period, floor = 100, 0.1

    def release(t):  # the Annealer's slope with its counter reset every period
        t = t % period
        return floor + (1 - floor) * (math.cos(math.pi * (t / period - 1)) + 1) / 2

    steps = [0, 1, 25, 50, 99, 100, 150, 1234]
    np.testing.assert_allclose([float(kl_annealing(s, period, floor)) for s in steps], [release(s) for s in steps],
                               rtol=1e-5)
    assert float(kl_annealing(0, period, floor)) == pytest.approx(floor)
    assert float(kl_annealing(period - 1, period, floor)) > 0.99


def test_vpl_sphere_projection_keeps_the_direction_at_radius_root_d():
    z = jax.random.normal(jax.random.key(3), (5, 8)) * 7.0
    projected = sphere_projection(z)
    np.testing.assert_allclose(jnp.linalg.norm(projected, axis=-1), math.sqrt(8), rtol=1e-5)
    np.testing.assert_allclose(projected / jnp.linalg.norm(projected, axis=-1, keepdims=True),
                               z / jnp.linalg.norm(z, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sphere_projection(jnp.zeros((1, 8))), 0.0)


def test_vpl_objective_is_the_annealed_elbo_computed_by_hand(episodes):
    config = VPLConfig(hidden_dim=16, latent_dim=8, kl_weight=0.3, kl_anneal_period=40)
    model = build_reward_model(1, config, 0)
    key, step = jax.random.key(5), jnp.int32(13)
    mean, log_var = model.posterior(episodes)
    assert float(jnp.max(jnp.abs(mean))) <= 1.0 and float(jnp.max(jnp.abs(log_var))) <= 1.0  # clamped
    z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape)
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True) * math.sqrt(8)
    reward = model.reward
    nll = -jax.nn.log_sigmoid(reward(episodes.target_chosen, z) - reward(episodes.target_rejected, z)).mean(-1)
    kl = -0.5 * jnp.sum(1 + log_var - mean**2 - jnp.exp(log_var), axis=-1)
    anneal = 0.1 + 0.9 * (math.cos(math.pi * (13 / 40 - 1)) + 1) / 2
    expected = jnp.mean(nll + 0.3 * anneal * kl / SPEC.num_targets)
    loss, _ = model.objective(episodes, key, step=step)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    graphdef, params = nnx.split(model)  # the training loop hands the objective its step
    np.testing.assert_allclose(_episode_loss(graphdef, {}, params, episodes, key, step)[0], expected, rtol=1e-5)


def test_vpl_reward_is_the_decoder_on_the_concatenation(episodes):
    model = build_reward_model(1, SMALL["vpl"], 0)
    z = model.context_latent(episodes)
    joined = jnp.concatenate([episodes.target_chosen, jnp.broadcast_to(z[:, None], (*z.shape[:1], 8, 8))], -1)
    np.testing.assert_allclose(model.reward(episodes.target_chosen, z), model.decoder(joined)[..., 0],
                               rtol=1e-5, atol=1e-6)


def test_active_units_count_dimensions_whose_mean_varies_across_users():
    mean = np.zeros((50, 4), np.float32)
    mean[:, 1] = np.linspace(-1, 1, 50)  # variance ≈ 0.35
    mean[:, 2] = np.linspace(-0.05, 0.05, 50)  # variance ≈ 0.0009
    assert float(active_latent_units(jnp.asarray(mean))) == pytest.approx(0.25)
    assert float(active_latent_units(jnp.asarray(mean), threshold=1e-4)) == pytest.approx(0.5)


# -- GPO -------------------------------------------------------------------------------------------
def test_gpo_key_mask_lets_rows_see_the_real_context_only():
    context_mask = jnp.array([[True, True, False], [False, False, False]])
    mask = np.asarray(gpo_key_mask(context_mask, 2))
    for b in range(2):
        expected = [not context_mask[b].any()]  # the null token, for an empty context only
        expected += [bool(context_mask[b, j]) for j in range(3)] * 2 + [False] * 4
        assert mask[b].tolist() == expected


def test_gpo_targets_do_not_see_each_other(episodes):
    model = build_reward_model(1, SMALL["gpo"], 0)
    moved = episodes._replace(target_chosen=episodes.target_chosen.at[:, 0].add(0.7))
    before, after = model.predict_log_odds(episodes), model.predict_log_odds(moved)
    np.testing.assert_allclose(after[:, 1:], before[:, 1:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[:, 0], before[:, 0])


def test_gpo_null_token_speaks_only_for_an_empty_context(episodes):
    model, other = (build_reward_model(1, SMALL["gpo"], 0) for _ in range(2))
    other.null_token[...] = other.null_token[...] + 1.0
    np.testing.assert_allclose(other.predict_log_odds(episodes), model.predict_log_odds(episodes), rtol=1e-6)
    empty = episodes._replace(context_mask=jnp.zeros_like(episodes.context_mask))
    assert not np.allclose(other.predict_log_odds(empty), model.predict_log_odds(empty))


def test_gpo_losses_against_direct_computations(episodes):
    means = jax.random.normal(jax.random.key(6), (3, 5, 2))
    log_stds = 0.3 * jax.random.normal(jax.random.key(7), (3, 5, 2))
    p = jax.nn.softmax(means, axis=-1)
    direct = -(norm.logpdf(1.0, p[..., 0], jnp.exp(log_stds[..., 0])) + norm.logpdf(0.0, p[..., 1],
                                                                                     jnp.exp(log_stds[..., 1])))
    np.testing.assert_allclose(gaussian_nll_of_choices(means, log_stds), direct, rtol=1e-5)
    np.testing.assert_allclose(p[..., 0], jax.nn.sigmoid(means[..., 0] - means[..., 1]), rtol=1e-6)
    gaussian, bce = (build_reward_model(1, GPOConfig(model_dim=16, num_layers=2, feedforward_dim=16, loss=loss), 0)
                     for loss in ("gaussian_nll", "bce"))
    # Padding targets (mask False) count in neither loss: every other target is padding here.
    padded = episodes._replace(target_mask=episodes.target_mask.at[:, ::2].set(False))
    mask = np.asarray(padded.target_mask, np.float64)
    per_pair = np.asarray(gaussian_nll_of_choices(*gaussian.target_outputs(padded)), np.float64)
    np.testing.assert_allclose(gaussian.objective(padded, jax.random.key(0))[0],
                               np.mean(np.sum(per_pair * mask, -1)), rtol=1e-5)
    m, _ = (np.asarray(x, np.float64) for x in bce.target_outputs(padded))
    nll = np.logaddexp(0.0, -(m[..., 0] - m[..., 1]))  # −log σ(m_c − m_r)
    np.testing.assert_allclose(bce.objective(padded, jax.random.key(0))[0],
                               np.mean(np.sum(nll * mask, -1) / mask.sum(-1)), rtol=1e-5)
