"""NP-DPO and DPO: response log-probabilities, the loss at initialisation, the reference, training."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nps.active import particle_latents
from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.pairs import OptionPairPool, PairPool, PolicyOptions
from nps.dpo import response_log_probs
from nps.encoder import EncoderConfig
from nps.errors import CheckpointError
from nps.layers import BaseParam
from nps.likelihood import choice_accuracy
from nps.lm import Decoder, DecoderConfig, LoRAConfig
from nps.models.interface import context_latents
from nps.models.peers import VPLConfig
from nps.models.policy import PolicyConfig, SteerablePolicy, policy_kind, with_reference_log_probs
from nps.train import loop
from nps.train.evaluate import evaluate_unseen_accuracy
from nps.train.loop import TrainConfig, fit, load_trained

DECODER = DecoderConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, max_position_embeddings=64)
POLICY = PolicyConfig(beta=0.5, encoder=EncoderConfig(hidden_dim=16, latent_dim=8, num_heads=2, attention_dropout=0.0),
                      vpl=VPLConfig(hidden_dim=16, latent_dim=8, kl_weight=0.3, kl_anneal_period=100),
                      lora=LoRAConfig(rank=4, targets=("q", "v")))
SPEC = EpisodeSpec(num_targets=4, max_context=3)
NUM_PAIRS, LENGTH, PROMPT = 48, 10, 3


def make_policy(kind="np", seed=0, **overrides):
    decoder = Decoder(DECODER, rngs=nnx.Rngs(seed))
    nnx.update(decoder, jax.device_put(nnx.state(decoder), jax.devices()[0]))  # committed, as a loaded base is
    return SteerablePolicy(decoder, 6, dataclasses.replace(POLICY, kind=kind, **overrides), rngs=nnx.Rngs(1))


def make_pool(seed=0):
    """Random options (prompt of 3 tokens, responses of 2..7 tokens, padding) and two users' utilities."""
    rng = np.random.default_rng(seed)
    count = 2 * NUM_PAIRS
    tokens = rng.integers(1, DECODER.vocab_size, (count, LENGTH)).astype(np.int32)
    lengths = rng.integers(PROMPT + 2, LENGTH + 1, count)
    token_mask = np.arange(LENGTH)[None] < lengths[:, None]
    tokens[~token_mask] = 0
    response_mask = token_mask & (np.arange(LENGTH)[None] >= PROMPT)
    # User 0 likes responses with low token ids, user 1 high ones: they disagree on every pair.
    low_share = np.sum(response_mask & (tokens < DECODER.vocab_size // 2), 1) / np.sum(response_mask, 1)
    utility = np.stack([low_share, -low_share], axis=1).astype(np.float32)
    features = rng.normal(size=(count, 6)).astype(np.float32)
    features[:, 0] = utility[:, 0]  # the context reveals which user this is
    options = PolicyOptions(jnp.asarray(tokens), jnp.asarray(token_mask), jnp.asarray(response_mask),
                            jnp.asarray(features), jnp.full((count,), jnp.nan))
    pairs = PairPool(jnp.arange(NUM_PAIRS)[:, None], jnp.arange(NUM_PAIRS, count)[:, None],
                     jnp.asarray(utility[:NUM_PAIRS]), jnp.asarray(utility[NUM_PAIRS:]))
    return OptionPairPool(pairs, options)


# One compiled program per call site instead of op-by-op (eager) execution: much faster to run.
objective = nnx.jit(lambda model, episodes, key: model.objective(episodes, key))
predict = nnx.jit(lambda model, episodes: model.predict_log_odds(episodes))


def perturb(state, scale=0.1):
    for index, (_, var) in enumerate(nnx.to_flat_state(state)):
        var[...] = var[...] + scale * jax.random.normal(jax.random.key(index), var[...].shape)


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_response_log_probs_sum_response_tokens_of_the_full_softmax(chunk):
    model = Decoder(DECODER, rngs=nnx.Rngs(0))
    options = make_pool().options
    hidden, _ = model.hidden_states(options.tokens, options.token_mask)
    got = response_log_probs(model.logits, hidden, options.tokens, options.response_mask, chunk)
    log_softmax = jax.nn.log_softmax(model(options.tokens, options.token_mask), axis=-1)
    per_token = np.take_along_axis(np.asarray(log_softmax[:, :-1]), np.asarray(options.tokens[:, 1:, None]), -1)[..., 0]
    expected = np.sum(np.where(np.asarray(options.response_mask[:, 1:]), per_token, 0.0), axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    # prompt and padding tokens are not scored: changing padding leaves the log-probs alone
    padded = options.tokens.at[:, -1].set(jnp.where(options.token_mask[:, -1], options.tokens[:, -1], 7))
    again = response_log_probs(model.logits, model.hidden_states(padded, options.token_mask)[0], padded,
                               options.response_mask, chunk)
    np.testing.assert_allclose(again, got, rtol=1e-6)


@pytest.mark.parametrize("kind", ["np", "vpl", "btl"])
def test_a_new_policy_is_its_reference_so_the_loss_is_log_2(kind):
    policy = make_policy(kind, reference="on_the_fly", vpl=dataclasses.replace(POLICY.vpl, kl_weight=0.0))
    episodes = sample_episodes(jax.random.key(0), make_pool(), SPEC, 5)
    loss, _ = objective(policy, episodes, jax.random.key(1))
    assert float(loss) == pytest.approx(np.log(2.0), abs=1e-6)
    np.testing.assert_array_equal(predict(policy, episodes), 0.0)


def test_precomputed_reference_gives_the_on_the_fly_loss():
    on_the_fly = make_policy("np", reference="on_the_fly")
    perturb(nnx.state(on_the_fly, nnx.Param))  # LoRA, FiLM, encoder: no longer the reference
    graphdef, state = nnx.split(on_the_fly)
    precomputed = nnx.merge(graphdef, state)
    precomputed.config = dataclasses.replace(on_the_fly.config, reference="precomputed")
    pool = make_pool()
    filled = OptionPairPool(pool.pairs, with_reference_log_probs(on_the_fly, pool.options, batch_size=32))
    episodes = sample_episodes(jax.random.key(2), pool, SPEC, 6)
    episodes_filled = sample_episodes(jax.random.key(2), filled, SPEC, 6)
    a, _ = objective(on_the_fly, episodes, jax.random.key(3))
    b, _ = objective(precomputed, episodes_filled, jax.random.key(3))
    assert abs(float(a) - np.log(2.0)) > 1e-3
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def test_context_steers_the_log_odds():
    policy = make_policy("np", reference="on_the_fly")
    perturb(nnx.state(policy, nnx.Param), scale=0.3)
    episodes = sample_episodes(jax.random.key(4), make_pool(), SPEC, 4, context_size=3)
    empty = episodes._replace(context_mask=jnp.zeros_like(episodes.context_mask))
    assert np.abs(np.asarray(predict(policy, episodes) - predict(policy, empty))).max() > 1e-3


def test_the_policy_goes_through_the_public_functions_as_a_per_user_model():
    policy = make_policy("np", reference="on_the_fly")
    perturb(nnx.state(policy, nnx.Param), scale=0.3)
    pool = make_pool()
    accuracy = evaluate_unseen_accuracy(policy, pool, SPEC, ["low", "high"], context_sizes=(2,), num_tasks=4, seed=3)
    key = jax.random.fold_in(jax.random.key(3), 0)
    episodes = sample_episodes(key, pool, SPEC.for_context(2), 4, 2)
    direct = choice_accuracy(predict(policy, episodes), episodes.unseen_mask)
    np.testing.assert_allclose(accuracy["2"]["all"]["mean"], float(jnp.mean(direct)), rtol=1e-6)
    # A user's latent from the features of their pairs alone (no tokens), as `SteeringRun.encode_user` asks it.
    chosen, rejected = (PolicyOptions.of_features(o.features) for o in (episodes.context_chosen,
                                                                         episodes.context_rejected))
    z = context_latents(policy, chosen, rejected, episodes.context_mask)
    np.testing.assert_allclose(z, jax.jit(lambda e: policy.context_latent(e))(episodes), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(particle_latents(policy, pool, SPEC, 4, 2, key), z, rtol=1e-5, atol=1e-6)


def test_vpl_dpo_is_conditional_dpo_plus_vpls_annealed_kl_and_steers_by_the_posterior_mean():
    """VPL-DPO (the peer comparison's policy): the loss is the KL-free conditional DPO loss plus
    β·a(step)·KL(N(μ, σ²) ‖ N(0, I)) / N^T per task, from the closed forms; its user state is μ, the same
    for any order of the context pairs, and the prior's mean 0 (no steering) for an empty context."""
    assert [policy_kind(name) for name in ("np_dpo", "vpl_dpo", "btl_dpo_mixed", "oracle_detail")] == \
        ["np", "vpl", "btl", "btl"]
    policy = make_policy("vpl", reference="on_the_fly")
    perturb(nnx.state(policy, nnx.Param), scale=0.3)
    assert policy.objective_reads_step and not make_policy("np").objective_reads_step
    episodes = sample_episodes(jax.random.key(8), make_pool(), SPEC, 5, context_size=3)
    step, key = jnp.int32(30), jax.random.key(9)
    with_kl = nnx.jit(lambda m, e: m.objective(e, key, step))
    loss, aux = with_kl(policy, episodes)
    no_kl = nnx.merge(*nnx.split(policy))
    no_kl.config = dataclasses.replace(policy.config, vpl=dataclasses.replace(policy.config.vpl, kl_weight=0.0))
    dpo_loss, _ = with_kl(no_kl, episodes)

    features = (episodes.context_chosen.features, episodes.context_rejected.features, episodes.context_mask)
    mean, log_var = (np.asarray(x, np.float64) for x in policy.encoder(*features))
    kl = 0.5 * np.sum(np.exp(log_var) + mean ** 2 - 1.0 - log_var, axis=-1)
    anneal = 0.1 + 0.9 * (np.cos(np.pi * (30 / 100 - 1.0)) + 1.0) / 2.0
    targets = np.asarray(episodes.target_mask).sum(-1)
    np.testing.assert_allclose(float(loss) - float(dpo_loss), np.mean(0.3 * anneal * kl / targets), rtol=1e-4)
    np.testing.assert_allclose(float(aux["kl"]), kl.mean(), rtol=1e-5)
    assert float(loss) > float(dpo_loss) > 0

    z = policy.context_latent(episodes)
    np.testing.assert_allclose(z, mean, rtol=1e-6, atol=1e-7)
    order = jnp.asarray([2, 0, 1])
    shuffled = episodes._replace(context_chosen=jax.tree.map(lambda x: x[:, order], episodes.context_chosen),
                                 context_rejected=jax.tree.map(lambda x: x[:, order], episodes.context_rejected),
                                 context_mask=episodes.context_mask[:, order])
    np.testing.assert_allclose(policy.context_latent(shuffled), z, rtol=1e-5, atol=1e-6)
    empty = episodes._replace(context_mask=jnp.zeros_like(episodes.context_mask))
    np.testing.assert_array_equal(policy.context_latent(empty), 0.0)
    np.testing.assert_allclose(predict(policy, empty), policy.target_log_odds(episodes, jnp.zeros_like(z)),
                               rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(predict(policy, episodes) - predict(policy, empty))).max() > 1e-3


def test_gradient_steps_lower_the_conditional_dpo_loss_of_a_batch():
    """Only the trainable parts move (LoRA, FiLM, encoder), and they fit a fixed batch."""
    import optax

    policy = make_policy("np", reference="on_the_fly")
    graphdef, frozen, params = nnx.split(policy, BaseParam, nnx.Param)
    episodes = sample_episodes(jax.random.key(6), make_pool(), SPEC, 8, context_size=2)
    optimizer = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(
            lambda p: nnx.merge(graphdef, frozen, p).objective(episodes, jax.random.key(0))[0]
        )(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for _ in range(25):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(np.log(2.0), abs=1e-6)
    assert losses[-1] < 0.6 * losses[0], losses


def test_fit_checkpoints_restore_and_refuse_another_base(tmp_path):
    pool = make_pool()
    filled = OptionPairPool(pool.pairs, with_reference_log_probs(make_policy("btl"), pool.options, batch_size=32))
    train = TrainConfig(steps=20, batch_size=4, learning_rate=1e-2, optimizer="adamw", eval_every=10,
                        checkpoint_every=10, val_tasks=8, grad_accum_steps=2, grad_clip_norm=1.0)
    run_config = {"base": {"weights_hash": "base-a"}}
    compiled_before = loop._train_chunk._cache_size()
    result = fit(make_policy("np"), filled, filled, SPEC, train, tmp_path / "np", run_config=run_config,
                 progress=False)
    assert [h["step"] for h in result.history] == [10, 20]
    assert loop._train_chunk._cache_size() - compiled_before == 1  # the first chunk's program serves the second
    restored = load_trained(make_policy("np"), tmp_path / "np", train, run_config=run_config)
    episodes = sample_episodes(jax.random.key(5), filled, SPEC, 4, context_size=2)
    np.testing.assert_allclose(predict(restored, episodes), predict(result.model(), episodes), rtol=1e-6)
    with pytest.raises(CheckpointError, match="base.weights_hash: 'base-a' in the checkpoint, 'base-b' now"):
        load_trained(make_policy("np"), tmp_path / "np", train, run_config={"base": {"weights_hash": "base-b"}})
    with pytest.raises(CheckpointError, match="base.weights_hash"):
        fit(make_policy("np"), filled, filled, SPEC, train, tmp_path / "np",
            run_config={"base": {"weights_hash": "base-b"}}, progress=False)


@pytest.mark.slow  # 8 simulated devices, a minute of compilation; -m slow runs it (tests/test_sharding.py keeps the
# reward model's 8-device check and tests/test_model_loading.py the sharded base's logits in the default run)
def test_policy_training_on_an_eight_device_mesh_matches_one_device(run_script):
    """Base sharded over (data, fsdp, tensor) by from_pretrained, batches split, adapters replicated."""
    run_script("tests/scripts/sharded_policy_fit.py", devices=8)
