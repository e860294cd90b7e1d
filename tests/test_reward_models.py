import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nps.config import config_from_dict
from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.synthetic import two_user_pools
from nps.encoder import EncoderConfig
from nps.errors import ConfigError
from nps.latent import gaussian_kl
from nps.likelihood import btl_log_odds, choice_nll, dpl_log_odds
from nps.models.reward import RewardModelConfig, build_reward_model
from nps.train.evaluate import rewards_given_context

SPEC = EpisodeSpec(num_targets=8, max_context=4)
ENCODER = EncoderConfig(hidden_dim=16, latent_dim=8)


@pytest.fixture(scope="module")
def episodes():
    pool = two_user_pools(num_pairs=500, seed=2)["train"]
    return sample_episodes(jax.random.key(0), pool, SPEC, 6)


def config(kind, **kwargs):
    return RewardModelConfig(kind=kind, hidden_dim=16, encoder=kwargs.pop("encoder", ENCODER), **kwargs)


def test_btl_and_dpl_log_odds_come_from_their_rewards(episodes):
    btl = build_reward_model(1, config("btl"), 0)
    expected = btl_log_odds(btl.reward(episodes.target_chosen), btl.reward(episodes.target_rejected))
    np.testing.assert_allclose(btl.predict_log_odds(episodes), expected)
    dpl = build_reward_model(1, config("dpl"), 0)
    mu_c, sd_c = dpl.reward_distribution(episodes.target_chosen)
    mu_r, sd_r = dpl.reward_distribution(episodes.target_rejected)
    np.testing.assert_allclose(dpl.predict_log_odds(episodes), dpl_log_odds(mu_c, sd_c, mu_r, sd_r))
    assert bool(jnp.all(sd_c > 0))


def test_context_free_models_ignore_the_context(episodes):
    for kind in ("btl", "dpl"):
        model = build_reward_model(1, config(kind), 0)
        other = episodes._replace(context_mask=jnp.zeros_like(episodes.context_mask))
        np.testing.assert_allclose(model.predict_log_odds(episodes), model.predict_log_odds(other))


def test_np_btl_reward_depends_on_the_context(episodes):
    model = build_reward_model(1, config("np"), 0)
    empty = episodes._replace(context_mask=jnp.zeros_like(episodes.context_mask))
    full = episodes._replace(context_mask=jnp.ones_like(episodes.context_mask))
    assert not np.allclose(model.predict_log_odds(empty), model.predict_log_odds(full))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_np_reward_is_the_decoder_mlp_on_the_concatenation(episodes, layer_norm):
    """r = MLP₂(MLP₁(y) ‖ z): the split first layer and the fused linear maps change no value."""
    model = build_reward_model(1, config("np", decoder_layer_norm=layer_norm), 0)
    z = model.context_latent(episodes)
    features = model.target_encoder(episodes.target_chosen)  # the plain MLP₁, layer by layer
    concatenated = jnp.concatenate([features, jnp.broadcast_to(z[:, None], (*features.shape[:-1], z.shape[-1]))], -1)
    kernel = jnp.concatenate([model.decoder.hidden.kernel[...], model.decoder_latent.kernel[...]], 0)
    expected = model.decoder.out(model.decoder.activate(concatenated @ kernel + model.decoder.hidden.bias[...]))[..., 0]
    np.testing.assert_allclose(model.reward(episodes.target_chosen, z), expected, rtol=1e-5, atol=1e-5)


def test_btl_reward_is_the_plain_composition_and_so_are_its_gradients(episodes):
    graphdef, params = nnx.split(build_reward_model(1, config("btl"), 0))

    def fused(p):
        return jnp.sum(nnx.merge(graphdef, p).reward(episodes.target_chosen) ** 2)

    def plain(p):
        model = nnx.merge(graphdef, p)
        return jnp.sum(model.head(model.target_encoder(episodes.target_chosen))[..., 0] ** 2)

    np.testing.assert_allclose(fused(params), plain(params), rtol=1e-5)
    chex.assert_trees_all_close(jax.grad(fused)(params), jax.grad(plain)(params), rtol=1e-4, atol=1e-6)


def test_variational_objective_is_nll_plus_kl_of_targets_from_context(episodes):
    cfg = config("np", encoder=EncoderConfig(hidden_dim=16, latent_dim=8, stochastic=True), kl_weight=0.7,
                 train_latent_samples=3)
    model = build_reward_model(1, cfg, 0)
    key = jax.random.key(5)
    loss, aux = model.objective(episodes, key)
    key_context, key_targets, key_z = jax.random.split(key, 3)
    q_c = model.encode_context(episodes, key_context)
    q_t = model.encode(episodes.target_chosen, episodes.target_rejected, episodes.target_mask, key_targets)
    z = q_t.sample(key_z, 3)
    nll = jnp.mean(jnp.stack([choice_nll(model.target_log_odds(episodes, zs), episodes.target_mask) for zs in z]), 0)
    kl = gaussian_kl(q_t, q_c)  # KL(q(z|T) ‖ q(z|C)), the NP direction
    expected = jnp.mean(nll + 0.7 * kl / SPEC.num_targets)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["kl"], jnp.mean(kl), rtol=1e-5)
    assert not np.allclose(jnp.mean(gaussian_kl(q_c, q_t)), jnp.mean(kl))  # the reversed one differs


def test_variational_prediction_is_finite_and_one_trace_serves_every_context_size(episodes):
    cfg = config("np", encoder=EncoderConfig(hidden_dim=16, latent_dim=8, stochastic=True), eval_latent_samples=5)
    graphdef, params = nnx.split(build_reward_model(1, cfg, 0))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def predict(params, mask):
        return nnx.merge(graphdef, params).predict_log_odds(episodes._replace(context_mask=mask), jax.random.key(0))

    for n in range(SPEC.max_context + 1):
        out = predict(params, jnp.arange(SPEC.max_context)[None, :] < jnp.full((6, 1), n))
        chex.assert_tree_all_finite(out)
        chex.assert_shape(out, (6, SPEC.num_targets))


def test_gradients_are_finite_with_empty_contexts(episodes):
    graphdef, params = nnx.split(build_reward_model(1, config("np"), 0))
    empty = episodes._replace(context_mask=jnp.zeros_like(episodes.context_mask))
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p).objective(empty, jax.random.key(0))[0]))(params)
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kind": "gp"}, "model.kind='gp' is unknown"),
        ({"encoder": {"aggregation": "max"}}, "model.encoder.aggregation='max' is unknown"),
        ({"eval_latent_samples": 0}, "model.eval_latent_samples=0 must be a positive integer"),
    ],
)
def test_bad_model_config_names_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(RewardModelConfig, fields, "model")


def test_rewards_given_context_are_each_tasks_reward_under_its_own_full_context():
    pool = two_user_pools(num_pairs=500, seed=2)["test"]
    model = build_reward_model(1, config("np"), 0)
    options = jnp.linspace(0.0, 1.0, 11)[:, None]
    rewards, user = rewards_given_context(model, pool, SPEC, options, 6, jax.random.key(3))
    episodes = sample_episodes(jax.random.key(3), pool, SPEC, 6, SPEC.max_context)  # the same tasks, eagerly
    chex.assert_shape(rewards, (6, 11))
    np.testing.assert_allclose(rewards, model.reward(options[None], model.context_latent(episodes)), atol=1e-5)
    np.testing.assert_array_equal(user, episodes.user)
