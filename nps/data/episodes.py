"""Episodes (tasks) of the neural-process training scheme, sampled inside jit.

A task is one simulated user: a user type k, N^T target pairs labelled by that
user's utility, and a context of N^C of those pairs (𝒟^C ⊆ 𝒟^T, paper App. C).
Context sizes are masks over a fixed capacity, so one compiled sampler and one
compiled model serve N^C = 0..max.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nps.config import check_positive
from nps.data.pairs import OptionPairPool, PairPool, order_pairs, prefers_first, user_utility
from nps.errors import ConfigError, invalid


CAPACITY_STEP = 8


def context_capacity(count: int) -> int:
    """The slots that hold ``count`` answered pairs of one user (a context, a profile, its answers
    in order) outside a sampler: the next multiple of 8, at least 8. Sizes are masks over the slots,
    so a growing profile compiles a new program once per 8 answers, and at most 7 slots are padding
    (a policy's profile checks run the LM on every slot, for every proposed z)."""
    return max(CAPACITY_STEP, -(-count // CAPACITY_STEP) * CAPACITY_STEP)


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

    def __post_init__(self):
        check_positive(self, "num_targets")
        for name in ("min_context", "max_context"):
            if getattr(self, name) < 0:
                raise invalid(name, getattr(self, name), "cannot be negative")
        if self.user_prior not in ("types", "dirichlet"):
            raise invalid("user_prior", self.user_prior, "is unknown; use 'types' or 'dirichlet'")
        if self.dirichlet_concentration <= 0:
            raise invalid("dirichlet_concentration", self.dirichlet_concentration, "must be positive")
        if self.min_context > self.max_context:
            raise invalid("min_context", self.min_context, f"exceeds max_context={self.max_context}; lower min_context")
        if self.max_context > self.num_targets:
            raise invalid("max_context", self.max_context, f"exceeds num_targets={self.num_targets}: the context is "
                          "a subset of the targets; raise num_targets or lower max_context")

    def for_context(self, context_size: int) -> EpisodeSpec:
        """This spec with room for ``context_size`` context pairs (capacity and N^T raised where needed)."""
        return dataclasses.replace(self, num_targets=max(self.num_targets, context_size),
                                   max_context=max(self.max_context, context_size))


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


def _label(pool: PairPool, pair_index: jax.Array, user_weights: jax.Array, coin: jax.Array):
    """Order each pair as (chosen, rejected) by the user's utility w · u; ties broken by ``coin``."""
    utility_a = user_utility(pool.utility_a[pair_index], user_weights)
    utility_b = user_utility(pool.utility_b[pair_index], user_weights)
    return order_pairs(prefers_first(utility_a, utility_b, coin), pool.option_a[pair_index], pool.option_b[pair_index])


# One compiled program per (spec, num_tasks), called alone or inlined into a caller's jit; the pool
# is an argument, never a constant.
@functools.partial(jax.jit, static_argnums=(2, 3))
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
        return episodes._replace(
            context_chosen=pool.rows(episodes.context_chosen),
            context_rejected=pool.rows(episodes.context_rejected),
            target_chosen=pool.rows(episodes.target_chosen),
            target_rejected=pool.rows(episodes.target_rejected),
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


def sample_with_separate_contexts(key, pools, spec: EpisodeSpec, num_tasks: int, context_size) -> Episodes:
    """Tasks whose targets come from ``pools[0]`` and whose N^C context pairs come from ``pools[1]``
    (labelled by the same users; the conflict-rate study, Fig. 5); nested in N^C for the same key,
    as ``sample_episodes``."""
    targets_pool, contexts_pool = pools
    targets = sample_episodes(key, targets_pool, spec, num_tasks, 0)
    context_spec = dataclasses.replace(spec, num_targets=spec.max_context, min_context=0)
    contexts = sample_episodes(jax.random.fold_in(key, 2), contexts_pool, context_spec, num_tasks, context_size,
                               user_weights=targets.user_weights)
    return targets._replace(context_chosen=contexts.context_chosen, context_rejected=contexts.context_rejected,
                            context_mask=contexts.context_mask)


def episode_batches(pool: PairPool | OptionPairPool, spec: EpisodeSpec, num_tasks: int, seed: int = 0):
    """A Grain ``MapDataset`` of episode batches for host-side input pipelines.

    Element i is ``sample_episodes(fold_in(key(seed), i), pool, spec, num_tasks)`` as numpy
    arrays: fixed shapes, reproducible by index (so a Grain iterator's checkpoint resumes the
    stream exactly), and ready for Grain's prefetching and sharding. nps's own ``fit`` samples
    the same episodes inside its jitted step instead, with no host round trip.
    """
    import grain

    key = jax.random.key(seed)
    return grain.MapDataset.range(2**31 - 1).map(
        lambda index: jax.tree.map(
            np.asarray, sample_episodes(jax.random.fold_in(key, index), pool, spec, num_tasks))
    )
