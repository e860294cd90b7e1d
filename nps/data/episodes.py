"""Episodes (tasks) of the neural-process training scheme, sampled inside jit.

A task is one simulated user: a user type k, N^T target pairs labelled by that
user's utility, and a context of N^C of those pairs (𝒟^C ⊆ 𝒟^T, paper App. C).
Context sizes are masks over a fixed capacity, so one compiled sampler and one
compiled model serve N^C = 0..max.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nps.errors import ConfigError


class PairPool(NamedTuple):
    """A split of option pairs with each user type's utility for both options.

    option_a, option_b: ``[N, D]`` option features.
    utility_a, utility_b: ``[N, K]`` utility of each option for each of K user types.
    """

    option_a: jax.Array
    option_b: jax.Array
    utility_a: jax.Array
    utility_b: jax.Array

    @property
    def num_pairs(self) -> int:
        return self.option_a.shape[0]

    @property
    def num_user_types(self) -> int:
        return self.utility_a.shape[-1]


class OptionPairPool(NamedTuple):
    """Pairs whose options are rows of a table: token sequences, features, reference log-probs.

    pairs: a ``PairPool`` whose option_a / option_b are ``[N, 1]`` int32 row ids into ``options``.
    options: any pytree of arrays with a leading axis M (one row per option).
    ``sample_episodes`` samples ids as usual and then gathers the rows, so the episodes'
    chosen/rejected fields hold ``options``-shaped pytrees with leading axes [B, C] / [B, T].
    """

    pairs: PairPool
    options: Any

    @property
    def num_pairs(self) -> int:
        return self.pairs.num_pairs

    @property
    def num_user_types(self) -> int:
        return self.pairs.num_user_types


def single_user(pool: PairPool | OptionPairPool, user: int) -> PairPool | OptionPairPool:
    """The same pairs labelled by one user type only (an oracle's training data).

    Every user column becomes ``user``'s, so the pool keeps its shapes and an oracle's
    training compiles once for all users (and shares the mixed baseline's compilation).
    """
    if isinstance(pool, OptionPairPool):
        return pool._replace(pairs=single_user(pool.pairs, user))

    def only(utility):
        return jnp.broadcast_to(utility[:, user : user + 1], utility.shape)

    return pool._replace(utility_a=only(pool.utility_a), utility_b=only(pool.utility_b))


def oracle_pools(pools: dict[str, Any], user: int) -> dict[str, Any]:
    """An oracle's splits: train and val labelled by ``user`` alone, test by every user type."""
    return {split: pool if split == "test" else single_user(pool, user) for split, pool in pools.items()}


class Episodes(NamedTuple):
    """A batch of B tasks; context capacity C, N^T = T targets, options ``[..., D]``.

    context_chosen, context_rejected: ``[B, C, D]``; context_mask ``[B, C]`` bool.
    target_chosen, target_rejected: ``[B, T, D]``; target_mask ``[B, T]`` bool.
    target_in_context: ``[B, T]`` bool, True for targets that are also context pairs.
    user: ``[B]`` int, the task's user type z* (for a continuum user: the attribute with the largest weight).
    user_weights: ``[B, K]`` the user's weight on each user type's utility (one-hot for a user type).
    """

    context_chosen: jax.Array
    context_rejected: jax.Array
    context_mask: jax.Array
    target_chosen: jax.Array
    target_rejected: jax.Array
    target_mask: jax.Array
    target_in_context: jax.Array
    user: jax.Array
    user_weights: jax.Array

    @property
    def unseen_mask(self) -> jax.Array:
        """Targets that are not in the context, 𝒟^T \\ 𝒟^C: the only ones scored."""
        return self.target_mask & ~self.target_in_context


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """Task shape; defaults are the paper's reward-model setting (N^C ~ U{0..10}, N^T = 20)."""

    num_targets: int = 20
    min_context: int = 0
    max_context: int = 10
    # The paper draws one N^C per batch ("all tasks in a batch share the same N^C").
    shared_context_size: bool = True
    # "types": each task is one of the K user types, uniformly. "dirichlet": a continuum user
    # whose utility is w · (the K utilities), w ~ Dirichlet(concentration · 1) (paper App. D.2).
    user_prior: str = "types"
    dirichlet_concentration: float = 0.5

    def validate(self, prefix: str = "episodes") -> None:
        if self.num_targets < 1:
            raise ConfigError(f"{prefix}.num_targets={self.num_targets} must be at least 1")
        if self.min_context < 0 or self.max_context < 0:
            raise ConfigError(
                f"{prefix}.min_context={self.min_context}, {prefix}.max_context={self.max_context}: "
                "context sizes cannot be negative"
            )
        if self.user_prior not in ("types", "dirichlet"):
            raise ConfigError(f"{prefix}.user_prior={self.user_prior!r} is unknown; use 'types' or 'dirichlet'")
        if self.dirichlet_concentration <= 0:
            raise ConfigError(f"{prefix}.dirichlet_concentration={self.dirichlet_concentration} must be positive")
        if self.min_context > self.max_context:
            raise ConfigError(
                f"{prefix}.min_context={self.min_context} exceeds {prefix}.max_context={self.max_context}; "
                "lower min_context"
            )
        if self.max_context > self.num_targets:
            raise ConfigError(
                f"{prefix}.max_context={self.max_context} exceeds {prefix}.num_targets={self.num_targets}: "
                "the context is a subset of the targets; raise num_targets or lower max_context"
            )


def _uniform_below(bits: jax.Array, n) -> jax.Array:
    """Integers in [0, n) from uniform uint32 bits (modulo bias ≤ n / 2³², negligible here)."""
    return (bits % jnp.asarray(n, jnp.uint32)).astype(jnp.int32)


def _subset_without_replacement(bits: jax.Array, population: int) -> jax.Array:
    """Uniform random subset of range(population) of size ``len(bits)`` (Floyd's algorithm).

    O(size²) work from ``size`` random words; avoids permuting the whole pool per task.
    """
    size = bits.shape[0]

    def pick(i, picks):
        top = population - size + i
        candidate = _uniform_below(bits[i], top + 1)
        return picks.at[i].set(jnp.where(jnp.any(picks == candidate), top, candidate))

    return jax.lax.fori_loop(0, size, pick, jnp.full((size,), -1, jnp.int32))


def user_utility(utility: jax.Array, user_weights: jax.Array) -> jax.Array:
    """w · u per user: utilities [U, M, K] or [M, K] (shared by all users), weights [U, K] -> [U, M].

    For a one-hot w this is exactly the user type's utility (x·1 + y·0 = x in floating point;
    an elementwise product and sum, not a matmul, which accelerators may round to bf16/tf32).
    """
    return jnp.sum(utility * user_weights[:, None, :], axis=-1)


def order_pairs(a_chosen: jax.Array, option_a: Any, option_b: Any) -> tuple[Any, Any]:
    """(chosen, rejected) option pytrees from ``a_chosen`` [...] (broadcast over each leaf's option dims)."""
    def pick(x, y, take_x):
        return jnp.where(take_x.reshape(take_x.shape + (1,) * (x.ndim - take_x.ndim)), x, y)

    return (jax.tree.map(lambda x, y: pick(x, y, a_chosen), option_a, option_b),
            jax.tree.map(lambda x, y: pick(x, y, ~a_chosen), option_a, option_b))


def _label(pool: PairPool, pair_index: jax.Array, user_weights: jax.Array, coin: jax.Array):
    """Order each pair as (chosen, rejected) by the user's utility w · u; ties broken by ``coin``."""
    utility_a = user_utility(pool.utility_a[pair_index], user_weights)
    utility_b = user_utility(pool.utility_b[pair_index], user_weights)
    a_wins = (utility_a > utility_b) | ((utility_a == utility_b) & coin)
    return order_pairs(a_wins, pool.option_a[pair_index], pool.option_b[pair_index])


def sample_episodes(
    key: jax.Array,
    pool: PairPool | OptionPairPool,
    spec: EpisodeSpec,
    num_tasks: int,
    context_size: jax.Array | int | None = None,
    user_weights: jax.Array | None = None,
) -> Episodes:
    """Sample ``num_tasks`` tasks from ``pool`` (jit-friendly; shapes depend only on ``spec``).

    Each task draws a user type uniformly, N^T distinct pairs, and N^C ~ U{min..max}
    context pairs among its targets. ``context_size`` fixes N^C for every task
    (evaluation): the same key with a larger size gives nested contexts over the
    same users and targets. ``user_weights`` [num_tasks, K] fixes the users (e.g. to pair
    context and target episodes drawn from different pools). For an ``OptionPairPool`` the
    options are its table's rows.
    """
    if isinstance(pool, OptionPairPool):
        episodes = sample_episodes(key, pool.pairs, spec, num_tasks, context_size, user_weights)
        rows = lambda ids: jax.tree.map(lambda table: table[ids[..., 0]], pool.options)  # noqa: E731
        return episodes._replace(
            context_chosen=rows(episodes.context_chosen),
            context_rejected=rows(episodes.context_rejected),
            target_chosen=rows(episodes.target_chosen),
            target_rejected=rows(episodes.target_rejected),
        )
    T, C = spec.num_targets, spec.max_context
    if pool.num_pairs < T:
        raise ConfigError(f"a pool of {pool.num_pairs} pairs cannot give a task {T} distinct target pairs; "
                          "use more data or lower episodes.num_targets")
    # All randomness from one PRNG call: every separate call compiles its own generator.
    bits = jax.random.bits(key, (num_tasks, 3 * T + 2), jnp.uint32)
    pair_bits, tie_bits, order_bits = bits[:, :T], bits[:, T : 2 * T], bits[:, 2 * T : 3 * T]
    K = pool.num_user_types
    if user_weights is None and spec.user_prior == "dirichlet":
        concentration = jnp.full((K,), spec.dirichlet_concentration, jnp.float32)
        user_weights = jax.random.dirichlet(jax.random.fold_in(key, 1), concentration, (num_tasks,))
    elif user_weights is None:
        user_weights = jax.nn.one_hot(_uniform_below(bits[:, 3 * T], K), K, dtype=pool.utility_a.dtype)
    user_weights = jnp.asarray(user_weights, pool.utility_a.dtype)
    pair_index = jax.vmap(_subset_without_replacement, in_axes=(0, None))(pair_bits, pool.num_pairs)
    target_chosen, target_rejected = _label(pool, pair_index, user_weights, (tie_bits & 1) == 1)

    if context_size is None:
        size_bits = bits[:1, 3 * T + 1] if spec.shared_context_size else bits[:, 3 * T + 1]
        context_size = spec.min_context + _uniform_below(size_bits, spec.max_context - spec.min_context + 1)
    context_size = jnp.broadcast_to(jnp.asarray(context_size, jnp.int32), (num_tasks,))

    # A random order of target positions; the first N^C of them are the context.
    order = jnp.argsort(order_bits, axis=-1)
    rank = jnp.argsort(order, axis=-1)  # rank[b, t]: where target t falls in the order
    context_slots = order[:, :C]
    take = jax.vmap(lambda x, i: x[i])
    return Episodes(
        context_chosen=take(target_chosen, context_slots),
        context_rejected=take(target_rejected, context_slots),
        context_mask=jnp.arange(C)[None, :] < context_size[:, None],
        target_chosen=target_chosen,
        target_rejected=target_rejected,
        target_mask=jnp.ones((num_tasks, T), bool),
        target_in_context=rank < context_size[:, None],
        user=jnp.argmax(user_weights, axis=-1).astype(jnp.int32),
        user_weights=user_weights,
    )


def episode_batches(pool: PairPool | OptionPairPool, spec: EpisodeSpec, num_tasks: int, seed: int = 0):
    """A Grain ``MapDataset`` of episode batches for host-side input pipelines.

    Element i is ``sample_episodes(fold_in(key(seed), i), pool, spec, num_tasks)`` as numpy
    arrays: fixed shapes, reproducible by index (so a Grain iterator's checkpoint resumes the
    stream exactly), and ready for Grain's prefetching and sharding. nps's own ``fit`` samples
    the same episodes inside its jitted step instead, with no host round trip.
    """
    import grain

    spec.validate()
    draw = jax.jit(lambda key: sample_episodes(key, pool, spec, num_tasks))
    key = jax.random.key(seed)
    return grain.MapDataset.range(2**31 - 1).map(
        lambda index: jax.tree.map(np.asarray, draw(jax.random.fold_in(key, index)))
    )
