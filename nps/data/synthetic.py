"""The paper's synthetic preference tasks (§5.1 two users, §5.2 correlated options).

Pools are generated on the host with NumPy from a seed (deterministic across
machines) and split 80/10/10 by an exact random permutation.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from nps.data.episodes import PairPool
from nps.errors import ConfigError

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def two_user_reward(y: np.ndarray, user: int, threshold: float = 0.5) -> np.ndarray:
    """Example 4.1: both users agree (r = y) up to the threshold; above it user 0
    prefers larger options (r = 2y) and user 1 smaller ones (r = 1 − y)."""
    above = 2.0 * y if user == 0 else 1.0 - y
    return np.where(y <= threshold, y, above)


def check_num_pairs(num_pairs: int, field: str = "num_pairs") -> None:
    """Every split of an 80/10/10 split needs at least one pair."""
    if num_pairs < 10:
        raise ConfigError(f"{field}={num_pairs} is too small to split 80/10/10; use at least 10")


def split_pool(option_a, option_b, utility_a, utility_b, seed: int) -> dict[str, PairPool]:
    """Exact 80/10/10 split of N pairs by a seeded permutation."""
    n = len(option_a)
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([int(round(f * n)) for f in SPLIT_FRACTIONS[:-1]])
    pools = {}
    for name, index in zip(SPLITS, np.split(order, bounds)):
        pools[name] = PairPool(
            *(jnp.asarray(x[index], jnp.float32) for x in (option_a, option_b, utility_a, utility_b))
        )
    return pools


def two_user_pools(num_pairs: int = 20_000, seed: int = 0, threshold: float = 0.5) -> dict[str, PairPool]:
    """§5.1: options y ~ U[0, 1], two user types, pairs split 80/10/10."""
    rng = np.random.default_rng(seed)
    options = rng.uniform(0.0, 1.0, size=(num_pairs, 2))
    utility = np.stack([two_user_reward(options, u, threshold) for u in (0, 1)], axis=-1)
    return split_pool(options[:, :1], options[:, 1:], utility[:, 0], utility[:, 1], seed + 1)


def two_user_identity(num_pairs: int, seed: int, threshold: float = 0.5) -> dict:
    """What checkpoints and results record about ``two_user_pools(num_pairs, seed, threshold)``."""
    return {"name": "synthetic-two-user", "num_pairs": num_pairs, "seed": seed, "threshold": threshold}


def correlated_options(rng: np.random.Generator, num: int, rho: float) -> np.ndarray:
    """Options [h0, h1] ~ N(0, [[1, ρ], [ρ, 1]]), valid for |ρ| = 1 too.  ``-> [num, 2]``."""
    h0 = rng.standard_normal(num)
    h1 = rho * h0 + np.sqrt(max(0.0, 1.0 - rho * rho)) * rng.standard_normal(num)
    return np.stack([h0, h1], axis=-1)


def correlated_pools(rho: float, num_pairs: int = 20_000, seed: int = 0) -> dict[str, PairPool]:
    """§5.2 / Example 4.3: r(y, 0) = h0, r(y, 1) = h1; conflict rate 1/2 − arcsin(ρ)/π."""
    rng = np.random.default_rng(seed)
    a, b = correlated_options(rng, num_pairs, rho), correlated_options(rng, num_pairs, rho)
    return split_pool(a, b, a, b, seed + 1)


def correlated_identity(rho: float, num_pairs: int, seed: int) -> dict:
    """What checkpoints and results record about ``correlated_pools(rho, num_pairs, seed)``."""
    return {"name": "synthetic-correlated", "rho": rho, "num_pairs": num_pairs, "seed": seed}


def bayes_error_single_pair(rho: float) -> float:
    """Bayes-optimal error of inferring z* from one context pair: 1/4 + arcsin(ρ)/(2π)."""
    return 0.25 + float(np.arcsin(rho)) / (2.0 * np.pi)
