"""PAL-A, PAL-B and LoRe: their defining maths, the new user's fit, its empty-context rule and invariances,
and training by ``fit`` and evaluation by ``evaluate_unseen_accuracy`` unchanged."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from flax import nnx

from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.synthetic import TWO_USER_NAMES, two_user_pools
from nps.errors import ConfigError
from nps.models.peers import PEER_MODELS, LoRe, LoReConfig, PALA, PALB, PALConfig
from nps.likelihood import masked_mean
from nps.models.peers.mixture import fit_mixture_logits, logistic_loss
from nps.models.reward import build_reward_model
from nps.train.evaluate import evaluate_unseen_accuracy
from nps.train.loop import TrainConfig, fit

SPEC = EpisodeSpec(num_targets=8, max_context=5)
# Small models that learn the two-user task in 100 steps at fit's learning rate LEARNING_RATE[name]; PAL's
# user and logit-scale rates are 5 and 10 times that.
LEARNING_RATE = {"pal-a": 3e-3, "pal-b": 3e-3, "lore": 3e-2}
SMALL_PAL = PALConfig(dim=16, num_users=2, train_learning_rate=3e-3, user_learning_rate=1.5e-2,
                      logit_scale_learning_rate=3e-2, adapt_steps=30, adapt_learning_rate=0.05)
SMALL = {"pal-a": SMALL_PAL, "pal-b": dataclasses.replace(SMALL_PAL, kind="pal-b"),
         "lore": LoReConfig(num_users=2, feature_dim=16, adapt_steps=30)}


def build(name, option_dim=1, seed=0):
    return PEER_MODELS[name][1](option_dim, SMALL[name], rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def pools():
    return two_user_pools(num_pairs=2000, seed=3)


@pytest.fixture(scope="module")
def episodes(pools):
    return sample_episodes(jax.random.key(0), pools["train"], SPEC, 6, context_size=jnp.array([0, 1, 2, 3, 4, 5]))


def test_every_registered_model_builds_from_its_default_config(episodes):
    for config_class, model_class in PEER_MODELS.values():
        model = model_class(1, config_class(), rngs=nnx.Rngs(0))
        chex.assert_shape(model.predict_log_odds(episodes), episodes.target_mask.shape)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_predictions_ignore_the_order_of_the_context_pairs(episodes, name):
    model = build(name)
    permutation = jax.random.permutation(jax.random.key(1), SPEC.max_context)
    shuffled = episodes._replace(context_chosen=episodes.context_chosen[:, permutation],
                                 context_rejected=episodes.context_rejected[:, permutation],
                                 context_mask=episodes.context_mask[:, permutation])
    np.testing.assert_allclose(model.predict_log_odds(shuffled), model.predict_log_odds(episodes), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_the_empty_context_is_the_uniform_mixture_and_padding_is_never_read(episodes, name):
    model = build(name)
    junk = episodes._replace(context_chosen=jnp.where(episodes.context_mask[..., None], episodes.context_chosen,
                                                      jnp.nan))
    z = model.context_latent(junk)
    k = z.shape[-1]
    np.testing.assert_array_equal(z[0], np.full(k, 1.0 / k, np.float32))  # task 0 has N^C = 0
    assert not np.allclose(z[1:], 1.0 / k)  # a context moves the mixture
    np.testing.assert_array_equal(model.predict_log_odds(junk), model.predict_log_odds(episodes))
    uniform = jnp.full((episodes.user.shape[0], k), 1.0 / k)
    np.testing.assert_allclose(model.predict_log_odds(junk)[0], model.target_log_odds(episodes, uniform)[0])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_predictions_never_read_the_targets_labels(episodes, name):
    """Swapping the labels of random targets negates their log-odds and changes nothing else."""
    model = build(name)
    swap = jax.random.bernoulli(jax.random.key(2), 0.5, episodes.target_mask.shape)
    chosen = jnp.where(swap[..., None], episodes.target_rejected, episodes.target_chosen)
    rejected = jnp.where(swap[..., None], episodes.target_chosen, episodes.target_rejected)
    relabelled = episodes._replace(target_chosen=chosen, target_rejected=rejected)
    expected = jnp.where(swap, -1.0, 1.0) * model.predict_log_odds(episodes)
    np.testing.assert_allclose(model.predict_log_odds(relabelled), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_tasks_fit_does_not_depend_on_the_other_tasks_in_its_batch(episodes, name):
    model = build(name)
    together = model.context_latent(episodes)
    alone = model.context_latent(jax.tree.map(lambda x: x[3:4], episodes))
    np.testing.assert_allclose(alone[0], together[3], rtol=1e-5, atol=1e-6)


def gelu_projector(model, x):
    """The release's mlp2-gelu, written out layer by layer from the model's weights."""
    p = model.projector
    h = jax.nn.gelu(x @ p.first.kernel[...] + p.first.bias[...])
    h = jax.nn.gelu(h @ p.rest.hidden.kernel[...] + p.rest.hidden.bias[...])
    return h @ p.rest.out.kernel[...] + p.rest.out.bias[...]


def test_pal_a_scores_by_the_distance_to_the_ideal_point_of_the_mixed_prototypes(episodes):
    config = PALConfig(dim=8, num_prototypes=3, num_users=2)
    model = PALA(2, config, rngs=nnx.Rngs(0))
    options = jax.random.normal(jax.random.key(3), (4, 5, 2))
    mixture = jax.nn.softmax(jax.random.normal(jax.random.key(4), (4, 3)), axis=-1)
    prototypes = model.prototypes[...] * config.user_learning_rate_ratio
    np.testing.assert_allclose(np.linalg.norm(prototypes, axis=-1), 1.0, rtol=1e-6)  # unit-normalised at init
    ideal = gelu_projector(model, mixture @ prototypes)  # a = f(softmax(w)ᵀP)
    expected = -np.linalg.norm(gelu_projector(model, options) - ideal[:, None], axis=-1)
    np.testing.assert_allclose(model.reward(options, mixture), expected, rtol=1e-5, atol=1e-5)


def test_pal_b_is_a_mixture_of_k_reward_functions(episodes):
    config = PALConfig(dim=8, num_prototypes=3, num_users=2)
    model = PALB(1, config, rngs=nnx.Rngs(0))
    mixture = jax.nn.softmax(jax.random.normal(jax.random.key(4), (6, 3)), axis=-1)
    g = model.ideal_points[...] * config.user_learning_rate_ratio  # [K, d]
    s = min(np.exp(model.logit_scale[...] * config.logit_scale_learning_rate_ratio), 100.0)
    np.testing.assert_allclose(s, 1 / 0.07, rtol=1e-5)

    def reward_functions(options):  # r_k(y) = s ⟨f(y)/‖f(y)‖, g_k⟩: [B, T, K]
        f = gelu_projector(model, options)
        return s * (f / np.linalg.norm(f, axis=-1, keepdims=True)) @ g.T

    margins = reward_functions(episodes.target_chosen) - reward_functions(episodes.target_rejected)
    norm = np.linalg.norm(mixture @ g, axis=-1)  # ‖u‖, one positive number per user
    expected = np.einsum("btk,bk->bt", margins, mixture) / norm[:, None]
    np.testing.assert_allclose(model.target_log_odds(episodes, mixture), expected, rtol=1e-4, atol=1e-4)


def test_lore_rewards_lie_in_the_span_of_its_low_rank_basis():
    config = LoReConfig(num_basis=2, num_users=3)
    model = LoRe(5, config, rngs=nnx.Rngs(0))
    options = jax.random.normal(jax.random.key(5), (3, 7, 5))
    mixture = jax.nn.softmax(jax.random.normal(jax.random.key(6), (3, 2)), axis=-1)
    expected = np.einsum("bnd,dk,bk->bn", options, model.basis[...], mixture) / 100.0  # φᵀ V p / 100
    np.testing.assert_allclose(model.reward(options, mixture), expected, rtol=1e-5, atol=1e-6)
    fifty_users = jax.nn.softmax(jax.random.normal(jax.random.key(7), (50, 2)), axis=-1)
    rewards = model.reward(options.reshape(1, 21, 5), fifty_users)  # [users, options]
    chex.assert_shape(rewards, (50, 21))
    assert np.linalg.matrix_rank(np.asarray(rewards)) == 2


def test_lore_fits_a_new_users_weights_to_the_minimum_of_its_context_loss():
    """The jitted Adam fit reaches scipy's minimum of the mean context loss over the mixture logits."""
    model = LoRe(3, LoReConfig(num_basis=3, num_users=1, adapt_steps=3000, adapt_learning_rate=0.05),
                 rngs=nnx.Rngs(0))
    chosen, rejected = jax.random.normal(jax.random.key(8), (2, 1, 6, 3)) * 30.0
    mask = jnp.array([[True] * 5 + [False]])
    fitted = model.fit_user_logits(chosen, rejected, mask)[0]
    margins = np.asarray(model.basis_rewards(chosen[0, :5]) - model.basis_rewards(rejected[0, :5]))

    def loss(w):
        return float(np.mean(np.logaddexp(0.0, -margins @ jax.nn.softmax(jnp.asarray(w)))))

    best = scipy.optimize.minimize(loss, np.zeros(3), method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10,
                                                                                     "maxiter": 20000})
    assert loss(fitted) <= best.fun + 1e-4
    assert loss(fitted) < loss(np.zeros(3)) - 1e-3  # the fit moved away from the uniform start


def test_fit_mixture_logits_is_plain_adam_on_each_tasks_mean_context_loss():
    margins_per_slot = jax.random.normal(jax.random.key(9), (2, 4, 3))  # [B, C, K]
    mask = jnp.array([[True, True, False, False], [True, True, True, True]])

    def pair_margins(logits):
        return jnp.einsum("bck,bk->bc", margins_per_slot, jax.nn.softmax(logits, -1))

    fitted = fit_mixture_logits(pair_margins, mask, 3, logistic_loss, 7, 0.1)
    for b in range(2):
        w, optimizer = jnp.zeros(3), optax.adam(0.1)
        state = optimizer.init(w)
        for _ in range(7):
            def loss(w):
                m = margins_per_slot[b][mask[b]] @ jax.nn.softmax(w)
                return jnp.mean(logistic_loss(m))
            updates, state = optimizer.update(jax.grad(loss)(w), state)
            w = w + updates
        np.testing.assert_allclose(fitted[b], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learning_rate", [1e-4, 1e-3])
def test_pal_groups_learn_at_the_releases_rates_whatever_fit_s_rate(episodes, learning_rate):
    """One Adam step at fit's lr moves W, P and PAL-B's g_k by the release's 5e-3, PAL-B's logit_scale by 0.1
    and a projector weight by lr, when the config is told that lr."""
    config = PALConfig(dim=16, num_users=2, train_learning_rate=learning_rate)

    def one_step(model):
        graphdef, params = nnx.split(model)
        optimizer = optax.adam(learning_rate)
        grads = jax.grad(lambda p: nnx.merge(graphdef, p).objective(episodes, jax.random.key(0))[0])(params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return nnx.merge(graphdef, optax.apply_updates(params, updates))

    def moved(before, after, name, ratio):
        return np.abs(getattr(after, name)[...] - getattr(before, name)[...]) * ratio

    pal_a = PALA(1, config, rngs=nnx.Rngs(0))
    pal_b = PALB(1, dataclasses.replace(config, kind="pal-b"), rngs=nnx.Rngs(0))
    stepped_a, stepped_b = one_step(pal_a), one_step(pal_b)
    ratio = config.user_learning_rate_ratio
    # both user rows appear in the batch
    np.testing.assert_allclose(moved(pal_a, stepped_a, "user_logits", ratio), 5e-3, rtol=1e-3)
    np.testing.assert_allclose(moved(pal_a, stepped_a, "prototypes", ratio), 5e-3, rtol=1e-3)
    np.testing.assert_allclose(moved(pal_b, stepped_b, "ideal_points", ratio), 5e-3, rtol=1e-3)
    np.testing.assert_allclose(moved(pal_b, stepped_b, "logit_scale", config.logit_scale_learning_rate_ratio), 0.1,
                               rtol=1e-3)
    kernel_step = moved(pal_a.projector.first, stepped_a.projector.first, "kernel", 1.0)
    assert np.max(kernel_step) < 1.001 * learning_rate
    # Adam's first step moves every stored value by about lr whatever its gradient: the rates above hold
    # only because the objective reads the stored table × ratio. The loss from softmax(stored × ratio):
    key = jax.random.key(0)
    mixture = jax.nn.softmax(pal_a.user_logits[...][episodes.user] * ratio, axis=-1)
    direct = jnp.mean(masked_mean(pal_a.pair_loss(pal_a.target_log_odds(episodes, mixture)), episodes.target_mask))
    np.testing.assert_allclose(pal_a.objective(episodes, key)[0], direct, rtol=1e-6)
    unscaled = jax.nn.softmax(pal_a.user_logits[...][episodes.user], axis=-1)
    assert not np.allclose(pal_a.target_log_odds(episodes, unscaled), pal_a.target_log_odds(episodes, mixture))


def test_fit_refuses_a_pal_config_told_another_rate_than_it_trains_at(episodes):
    """PAL's groups learn at their rate ÷ train_learning_rate × fit's rate: a config told another rate than
    fit's would train W, P and g_k at other rates than it records, so fit refuses it in one line."""
    pools = two_user_pools(num_pairs=200, seed=0)
    model = build_reward_model(1, PALConfig(dim=8, num_users=2, train_learning_rate=1e-4), seed=0)
    with pytest.raises(ConfigError, match=r"train.learning_rate=0.001 differs from the model config's "
                                          r"train_learning_rate=0.0001"):
        fit(model, pools["train"], pools["val"], EpisodeSpec(num_targets=4, max_context=2),
            TrainConfig(steps=1, learning_rate=1e-3), progress=False)


def test_a_user_id_outside_the_table_makes_the_loss_nan_not_a_default(episodes):
    model = PALA(1, PALConfig(dim=8, num_users=1), rngs=nnx.Rngs(0))
    assert np.isnan(model.objective(episodes, jax.random.key(0))[0])  # the episodes hold users 0 and 1
    assert np.isfinite(build("pal-a").objective(episodes, jax.random.key(0))[0])


@pytest.mark.parametrize("field, value", [("num_users", 0), ("adapt_steps", 0), ("adapt_learning_rate", 0.0)])
def test_bad_configs_name_their_field(field, value):
    for config_class in (PALConfig, LoReConfig):
        with pytest.raises(ConfigError, match=f"^{field}="):
            config_class(**{field: value})


@pytest.mark.parametrize("config_class, kind", [(PALConfig, "lore"), (LoReConfig, "pal-a")])
def test_a_config_of_another_kind_is_refused(config_class, kind):
    with pytest.raises(ConfigError, match="^kind="):
        config_class(kind=kind)


def test_build_reward_model_builds_the_kind_a_config_names():
    assert isinstance(build_reward_model(1, PALConfig(kind="pal-b", dim=8), seed=0), PALB)
    assert isinstance(build_reward_model(1, PALConfig(dim=8), seed=0), PALA)
    model = build_reward_model(1, LoReConfig(adapt_steps=7), seed=0)
    assert isinstance(model, LoRe) and model.adaptation_gradient_steps == 7


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fit_trains_them_and_the_unseen_target_evaluation_scores_them(pools, name):
    """Trained by type id, evaluated as new users: a context of 4 pairs beats none and the population's 78%."""
    config = TrainConfig(steps=100, batch_size=16, learning_rate=LEARNING_RATE[name], eval_every=50,
                         checkpoint_every=50, val_tasks=32)
    result = fit(build(name), pools["train"], pools["val"], SPEC, config, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    accuracy = evaluate_unseen_accuracy(result.model(), pools["test"], SPEC, TWO_USER_NAMES,
                                        context_sizes=(0, 4), num_tasks=200)
    assert accuracy["4"]["all"]["mean"] > max(accuracy["0"]["all"]["mean"], 0.85)
