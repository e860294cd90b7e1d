"""Preference pairs: who prefers which side of a pair, and the containers that hold pairs.

**The one tie rule.** A user prefers the option with the higher utility. On a tie they are
indifferent: their choice probability is 0.5 (``choices``), and wherever a simulated user must
name a side (a sampled task's labels, a simulated answer) a fair coin decides (``prefers_first``).

**The containers**, each for what the others cannot hold:

- ``PairPool``: N option pairs with each of K user types' utility for both options, the source of
  truth for every label; tasks (``nps.data.episodes``) are drawn from pools inside jit;
- ``OptionPairPool``: a ``PairPool`` whose options are row ids into an option table (token rows,
  features, reference log-probs stored once per option, not once per pair side);
- ``AnsweredPairs``: pairs whose U simulated users have answered (each user's side, ties decided),
  what active learning asks from and what the consistency study's users answer;
- ``nps.data.ultrafeedback.Pairs``: UltraFeedback's pairs on the host before they are a pool, with
  each attribute's choice (``choices``) for the recipes' filters and splits;
- ``nps.data.two_styles.PreferencePairs``: a steering run's sampled pairs as stored on disk (the
  option table, each user's reward per row, the splits), whose ``pools()`` are ``PairPool``s.

Also derived here without sampling: conflicts, oracle pools and the train/val/test split.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nps.errors import ConfigError

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def take_rows(tree: Any, index) -> Any:
    """Rows ``index`` (ids, a slice) of every leaf of an option pytree, along its leading axis."""
    return jax.tree.map(lambda x: x[index], tree)


class PairPool(NamedTuple):
    """A split of option pairs with each user type's utility for both options: the source of every
    label (a sampled task's, a simulated user's). The other pair containers and how each relates to
    this one: the module's docstring.

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

    @property
    def option_dim(self) -> int:
        """D, the width of an option's features (what a reward model's input layer takes)."""
        return self.option_a.shape[-1]

    def take(self, index) -> PairPool:
        """The pairs at ``index`` (ids [n])."""
        return take_rows(self, index)


class OptionPairPool(NamedTuple):
    """Pairs whose options are rows of a table: token sequences, features, reference log-probs. The same
    labels as a ``PairPool`` (its utilities), with each option stored once however many pairs hold it.

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

    @property
    def option_dim(self) -> int:
        """The width of the table's option features: ``options`` itself when it is one array
        [M, D], else its ``features`` field (a policy's ``PolicyOptions``)."""
        features = getattr(self.options, "features", self.options)
        return features.shape[-1]

    def rows(self, ids: jax.Array) -> Any:
        """The table's rows for option ids [..., 1] (a pool's option_a or option_b): leading axes [...]."""
        return jax.tree.map(lambda table: table[ids[..., 0]], self.options)

    def take(self, index) -> OptionPairPool:
        """The pairs at ``index`` (ids [n]), over the same table."""
        return self._replace(pairs=self.pairs.take(index))


class PolicyOptions(NamedTuple):
    """Responses as the policy reads them (any leading axes [...]).

    tokens [..., L] int32: prompt then response, right-padded; token_mask [..., L] bool.
    response_mask [..., L] bool: the response's tokens (scored by DPO).
    features [..., E] float32: a frozen embedding of prompt + response (the encoder's input).
    reference_log_prob [...] float32: log π_ref(response | prompt) (NaN until computed).
    """

    tokens: jax.Array
    token_mask: jax.Array
    response_mask: jax.Array
    features: jax.Array
    reference_log_prob: jax.Array

    @classmethod
    def of_features(cls, features: jax.Array) -> PolicyOptions:
        """Options that carry only their features [..., E]: all a policy's context encoder reads, so a
        user's latent needs no tokens."""
        return cls(None, None, None, features, None)


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


def choices(utility_a: np.ndarray, utility_b: np.ndarray) -> np.ndarray:
    """Each user type's choice per pair [N, K]: 1.0 if a has the higher utility, 0.0 if b has, 0.5 on a tie."""
    return np.where(utility_a > utility_b, 1.0, np.where(utility_a < utility_b, 0.0, 0.5))


def prefers_first(utility_a: jax.Array, utility_b: jax.Array, coin: jax.Array) -> jax.Array:
    """A user's answer on each pair, True for option a: the higher utility, a tie decided by ``coin``
    (bool, a fair coin: the choice probability of a tie is 0.5, ``choices``). Any shape; inside jit too."""
    return (utility_a > utility_b) | ((utility_a == utility_b) & coin)


def untied(choice: np.ndarray) -> np.ndarray:
    """[N] bool: pairs on which no user type is indifferent (``choice`` [N, K] from ``choices``)."""
    return ~np.any(np.asarray(choice) == 0.5, axis=1)


def conflicting(choice: np.ndarray) -> np.ndarray:
    """[N] bool: pairs on which the user types strictly disagree (no type ties, and not all choose alike)."""
    choice = np.asarray(choice)
    return untied(choice) & (choice.min(axis=1) != choice.max(axis=1))


def resolved_options(pool: PairPool | OptionPairPool) -> tuple[Any, Any]:
    """Every pair's two options as a model reads them: the pool's own, or an ``OptionPairPool``'s table rows."""
    if isinstance(pool, OptionPairPool):
        return pool.rows(pool.pairs.option_a), pool.rows(pool.pairs.option_b)
    return pool.option_a, pool.option_b


class AnsweredPairs(NamedTuple):
    """M pairs that U simulated users have answered: options a / b as a model reads them (any pytree with
    leading axis M: features [M, D], a policy's ``PolicyOptions``) and first_chosen [U, M], True where
    user u answers a. Unlike a pool, whose users are drawn per task, these users and their answers are
    fixed (``answer_pairs``): the same user answers the same pair alike every time it is asked."""

    option_a: Any
    option_b: Any
    first_chosen: jax.Array

    @property
    def num_pairs(self) -> int:
        return self.first_chosen.shape[1]

    def take(self, index) -> AnsweredPairs:
        """The pairs at ``index`` (ids [n]), answered by the same users."""
        return AnsweredPairs(take_rows(self.option_a, index), take_rows(self.option_b, index),
                             self.first_chosen[:, index])

    def profile(self, rng: np.random.Generator, users: np.ndarray, mistakes=()) -> tuple[Any, Any]:
        """A simulated profile: ``len(users)`` distinct random pairs, the i-th answered as user ``users[i]``
        answers it (a user who changes type part-way is a change in ``users``), and the answers at the
        positions ``mistakes`` reversed. Returns its chosen and rejected options (leading axis n)."""
        pairs = rng.choice(self.num_pairs, len(users), replace=False)
        first = np.asarray(self.first_chosen)[users, pairs]
        first[list(mistakes)] ^= True
        return order_pairs(jnp.asarray(first), take_rows(self.option_a, pairs), take_rows(self.option_b, pairs))


def answer_pairs(pool: PairPool | OptionPairPool, user_weights: jax.Array, key: jax.Array) -> AnsweredPairs:
    """Every pair of ``pool`` answered by U simulated users with weights [U, K] over its user types
    (one-hot: the user type itself), by ``prefers_first``, each tie decided by a coin drawn from ``key``."""
    pairs = pool.pairs if isinstance(pool, OptionPairPool) else pool
    utility_a, utility_b = user_utility(pairs.utility_a, user_weights), user_utility(pairs.utility_b, user_weights)
    coin = jax.random.bernoulli(key, shape=utility_a.shape)
    return AnsweredPairs(*resolved_options(pool), prefers_first(utility_a, utility_b, coin))


def check_splittable(num_pairs: int, field: str = "num_pairs") -> None:
    """Every split of an 80/10/10 split needs at least one pair."""
    if num_pairs < 10:
        raise ConfigError(f"{field}={num_pairs} is too small to split 80/10/10; use at least 10")


def split_indices(order: np.ndarray, fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, np.ndarray]:
    """Train / val / test parts of ``order`` (a permutation of whatever is split: pairs, prompts).

    Sizes are floors of the fractions, train and val first; the remainder goes to test.
    """
    train_end = int(fractions[0] * len(order))
    val_end = train_end + int(fractions[1] * len(order))
    return {"train": order[:train_end], "val": order[train_end:val_end], "test": order[val_end:]}


def split_pool(option_a, option_b, utility_a, utility_b, seed: int) -> dict[str, PairPool]:
    """Split N pairs (host arrays [N, D] and [N, K]) 80/10/10 by a seeded permutation into ``PairPool``s."""
    order = np.random.default_rng(seed).permutation(len(option_a))
    return {
        name: PairPool(*(jnp.asarray(x[index], jnp.float32) for x in (option_a, option_b, utility_a, utility_b)))
        for name, index in split_indices(order).items()
    }
