import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nps.config import config_from_dict
from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.pairs import AnsweredPairs, OptionPairPool, PairPool, answer_pairs, choices, prefers_first, untied
from nps.data.synthetic import two_user_pools, two_user_reward
from nps.errors import ConfigError

SPEC = EpisodeSpec(num_targets=8, min_context=0, max_context=5, shared_context_size=False)


@pytest.fixture(scope="module")
def pool():
    return two_user_pools(num_pairs=400, seed=3)["train"]


def sample(pool, key=0, spec=SPEC, tasks=64, size=None):
    return sample_episodes(jax.random.key(key), pool, spec, tasks, size)


def test_shapes_and_one_user_per_task(pool):
    ep = sample(pool)
    chex.assert_shape([ep.context_chosen, ep.context_rejected], (64, 5, 1))
    chex.assert_shape([ep.target_chosen, ep.target_rejected], (64, 8, 1))
    chex.assert_shape([ep.context_mask, ep.target_in_context, ep.target_mask], (64, None))
    # Every pair in a task is labelled by that task's own user type.
    for k in (0, 1):
        rows = np.asarray(ep.user) == k
        r_chosen = two_user_reward(np.asarray(ep.target_chosen[rows, :, 0]), k)
        r_rejected = two_user_reward(np.asarray(ep.target_rejected[rows, :, 0]), k)
        assert np.all(r_chosen >= r_rejected)
        assert rows.any()


def test_context_is_a_subset_of_the_targets_and_unseen_excludes_it(pool):
    ep = sample(pool, key=1)
    sizes = np.asarray(ep.context_mask.sum(-1))
    assert sizes.min() >= 0 and sizes.max() <= 5 and len(set(sizes)) > 1  # per-task sizes here
    np.testing.assert_array_equal(np.asarray(ep.target_in_context.sum(-1)), sizes)
    np.testing.assert_array_equal(np.asarray(ep.unseen_mask.sum(-1)), 8 - sizes)
    for b in range(64):
        targets = {(float(c), float(r)) for c, r in zip(ep.target_chosen[b, :, 0], ep.target_rejected[b, :, 0])}
        flagged = {
            (float(c), float(r))
            for c, r, f in zip(ep.target_chosen[b, :, 0], ep.target_rejected[b, :, 0], ep.target_in_context[b])
            if f
        }
        ctx = {
            (float(c), float(r))
            for c, r, m in zip(ep.context_chosen[b, :, 0], ep.context_rejected[b, :, 0], ep.context_mask[b])
            if m
        }
        assert ctx == flagged and ctx <= targets
        assert len(targets) == 8  # distinct pairs, drawn without replacement


def test_shared_context_size_is_one_per_batch(pool):
    ep = sample(pool, key=2, spec=EpisodeSpec(num_targets=8, max_context=5))
    assert len(set(np.asarray(ep.context_mask.sum(-1)).tolist())) == 1


def test_fixed_sizes_give_nested_contexts_over_the_same_tasks(pool):
    small, large = sample(pool, key=4, size=2), sample(pool, key=4, size=5)
    np.testing.assert_array_equal(small.user, large.user)
    np.testing.assert_array_equal(small.target_chosen, large.target_chosen)
    assert bool(jnp.all(small.target_in_context <= large.target_in_context))
    np.testing.assert_array_equal(small.context_chosen[:, :2], large.context_chosen[:, :2])


def test_without_replacement_even_when_the_pool_is_barely_large_enough():
    n = 8
    options = jnp.arange(2 * n, dtype=jnp.float32).reshape(n, 2)
    pool = PairPool(options[:, :1], options[:, 1:], options[:, :1], options[:, 1:])
    ep = sample_episodes(jax.random.key(0), pool, EpisodeSpec(num_targets=n, max_context=2), 32)
    for b in range(32):
        assert len(set(np.asarray(ep.target_chosen[b, :, 0]).tolist())) == n


def test_sampler_is_a_pure_function_of_the_key(pool):
    a, b, c = sample(pool, key=9), sample(pool, key=9), sample(pool, key=10)
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(a.target_chosen, c.target_chosen)


def test_user_types_are_balanced(pool):
    ep = sample(pool, key=5, tasks=4000)
    assert abs(float(jnp.mean(ep.user)) - 0.5) < 0.03


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_targets": 5, "max_context": 10}, "episodes.max_context=10 exceeds num_targets=5: .* raise num_targets"),
        ({"min_context": -1}, "episodes.min_context=-1 cannot be negative"),
        ({"min_context": 4, "max_context": 3}, "episodes.min_context=4 exceeds max_context=3; lower min_context"),
        ({"num_targets": 0, "max_context": 0}, "episodes.num_targets=0 must be a positive integer"),
    ],
)
def test_bad_specs_name_the_field_and_the_fix(fields, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(EpisodeSpec, fields, "episodes")


def test_synthetic_split_is_exactly_80_10_10():
    pools = two_user_pools(num_pairs=20_000, seed=0)
    assert {k: p.num_pairs for k, p in pools.items()} == {"train": 16_000, "val": 2_000, "test": 2_000}
    x = np.asarray(pools["train"].option_a)
    assert 0 <= x.min() and x.max() <= 1


def test_continuum_users_weigh_the_user_types_utilities():
    rng = np.random.default_rng(0)
    utility_a, utility_b = rng.normal(size=(300, 3)).astype(np.float32), rng.normal(size=(300, 3)).astype(np.float32)
    # Options are pair ids, so each sampled pair can be looked up.
    ids = jnp.arange(300, dtype=jnp.float32)[:, None]
    pool = PairPool(ids, ids + 1000, jnp.asarray(utility_a), jnp.asarray(utility_b))
    spec = EpisodeSpec(num_targets=6, max_context=3, user_prior="dirichlet", dirichlet_concentration=0.5)
    ep = sample_episodes(jax.random.key(4), pool, spec, 2000)
    w = np.asarray(ep.user_weights)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(ep.user), w.argmax(-1))
    # Dirichlet(0.5): E[w_k] = 1/3 and Var = (1/3)(2/3)/(1.5 + 1) = 0.0889.
    np.testing.assert_allclose(w.mean(0), 1 / 3, atol=0.02)
    np.testing.assert_allclose(w.var(0), (2 / 9) / 2.5, rtol=0.1)
    chosen = np.asarray(ep.target_chosen)[..., 0]
    rejected = np.asarray(ep.target_rejected)[..., 0]
    pair = np.where(chosen < 1000, chosen, rejected).astype(int)
    a_chosen = chosen < 1000
    score_a = np.einsum("btk,bk->bt", utility_a[pair], w)
    score_b = np.einsum("btk,bk->bt", utility_b[pair], w)
    assert np.all(np.where(a_chosen, score_a >= score_b - 1e-6, score_b >= score_a - 1e-6))


def test_given_user_weights_fix_the_users(pool):
    weights = jax.nn.one_hot(jnp.arange(64) % 2, 2)
    ep = sample_episodes(jax.random.key(5), pool, SPEC, 64, 3, user_weights=weights)
    np.testing.assert_array_equal(np.asarray(ep.user), np.arange(64) % 2)
    # One-hot weights label exactly as a drawn user type does.
    drawn = sample(pool, key=5, size=3)
    again = sample_episodes(jax.random.key(5), pool, SPEC, 64, 3, user_weights=drawn.user_weights)
    chex.assert_trees_all_equal(drawn, again)


def test_a_pool_smaller_than_a_task_is_refused(pool):
    small = jax.tree.map(lambda x: x[:7], pool)
    with pytest.raises(ConfigError, match="a pool of 7 pairs cannot give a task 8 distinct target pairs"):
        sample(small)


def test_grain_episode_batches_match_the_sampler_by_index(pool):
    from nps.data.episodes import episode_batches

    dataset = episode_batches(pool, SPEC, 16, seed=3)
    chex.assert_trees_all_equal(dataset[5], jax.tree.map(np.asarray, sample_episodes(
        jax.random.fold_in(jax.random.key(3), 5), pool, SPEC, 16)))
    iterator = iter(dataset.to_iter_dataset())
    next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = iter(dataset.to_iter_dataset())
    resumed.set_state(state)
    chex.assert_trees_all_equal(next(resumed), expected)


# -- who prefers which side: the one tie rule -----------------------------------------------------------
def test_a_tie_is_indifference_a_coin_where_a_side_must_be_named():
    utility_a, utility_b = np.array([[2.0, 1.0], [1.0, 1.0]]), np.array([[1.0, 1.0], [3.0, 1.0]])
    np.testing.assert_array_equal(choices(utility_a, utility_b), [[1.0, 0.5], [0.0, 0.5]])
    np.testing.assert_array_equal(untied(choices(utility_a, utility_b)), [False, False])
    for coin in (True, False):
        np.testing.assert_array_equal(prefers_first(utility_a, utility_b, np.full((2, 2), coin)),
                                      [[True, coin], [False, coin]])


def test_simulated_users_answer_every_pair_and_toss_a_coin_on_their_ties():
    table = {"row": jnp.arange(8) * 10}  # an option table; the pool names its rows
    pairs = PairPool(jnp.array([[0], [1], [2], [3]]), jnp.array([[4], [5], [6], [7]]),
                     jnp.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [2.0, 2.0]]),
                     jnp.array([[0.0, 1.0], [1.0, 0.0], [5.0, 4.0], [2.0, 2.0]]))
    answered = answer_pairs(OptionPairPool(pairs, table), jnp.eye(2), jax.random.key(0))
    np.testing.assert_array_equal(answered.option_a["row"], [0, 10, 20, 30])  # the table's rows, resolved
    np.testing.assert_array_equal(answered.option_b["row"], [40, 50, 60, 70])
    first = np.asarray(answered.first_chosen)
    np.testing.assert_array_equal(first[0, :2], [True, False])  # user type 0; its pairs 2 and 3 tie
    np.testing.assert_array_equal(first[1, :3], [False, True, True])  # user type 1; its pair 3 ties
    # Pair 2 ties for user 0, pair 3 for both: over many users a tie goes each way about half the time.
    many = answer_pairs(pairs, jnp.tile(jnp.eye(2), (500, 1)), jax.random.key(1)).first_chosen
    assert 0.4 < float(jnp.mean(many[0::2, 3])) < 0.6 and 0.4 < float(jnp.mean(many[1::2, 3])) < 0.6
    assert bool(jnp.all(many[1::2, 2]))  # user 1 does not tie on pair 2: 5 > 4, every time


def test_a_simulated_profile_answers_as_its_types_and_reverses_its_mistakes():
    options = jnp.arange(20.0)[:, None]
    # User type 0 prefers a on every pair, type 1 prefers b.
    answered = AnsweredPairs(options, options + 100, jnp.stack([jnp.ones(20, bool), jnp.zeros(20, bool)]))
    types = np.array([0, 0, 0, 1, 1, 1])
    chosen, rejected = answered.profile(np.random.default_rng(0), types, mistakes=[1, 4])
    picked_a = np.asarray(chosen[:, 0] < 100)
    np.testing.assert_array_equal(picked_a, [True, False, True, False, True, False])
    assert len(set(np.asarray(jnp.minimum(chosen, rejected))[:, 0].tolist())) == 6  # distinct pairs
    np.testing.assert_array_equal(answered.take(np.array([3, 5])).option_a[:, 0], [3.0, 5.0])
