"""Synthetic preference tasks: any options and per-user utilities, and the paper's two (§5.1, §5.2).

``synthetic_task`` is the one way to build a task from code: a function that draws option
pairs and one utility function per user type. Pools are generated on the host with NumPy
from a seed (deterministic across machines) and split 80/10/10 by a seeded permutation
(``nps.data.pairs.split_pool``). docs/api.md has a worked three-user example.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from nps.data.pairs import PairPool, split_pool

TWO_USER_NAMES = ["z=0", "z=1"]  # the user types of the two-user and correlated-option tasks


def synthetic_task(
    sample_pairs: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    utilities: Sequence[Callable[[np.ndarray], np.ndarray]],
    num_pairs: int,
    seed: int = 0,
) -> dict[str, PairPool]:
    """Train / val / test pools of ``num_pairs`` option pairs labelled by K user types.

    ``sample_pairs(rng, n) -> (a, b)``: the two options of n pairs, each ``[n, D]``.
    ``utilities[k](options [n, D]) -> [n]``: user type k's utility; a user chooses the option
    with the higher utility. The pairs are drawn with ``default_rng(seed)``, split with ``seed + 1``.
    """
    a, b = sample_pairs(np.random.default_rng(seed), num_pairs)
    utility_a = np.stack([u(a) for u in utilities], axis=-1)
    utility_b = np.stack([u(b) for u in utilities], axis=-1)
    return split_pool(a, b, utility_a, utility_b, seed + 1)


def uniform_pairs(rng: np.random.Generator, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of scalar options y ~ U[0, 1] (§5.1): ``-> ([num, 1], [num, 1])``."""
    options = rng.uniform(0.0, 1.0, size=(num, 2))
    return options[:, :1], options[:, 1:]


def two_user_reward(y: np.ndarray, user: int, threshold: float = 0.5) -> np.ndarray:
    """Example 4.1: both users agree (r = y) up to the threshold; above it user 0
    prefers larger options (r = 2y) and user 1 smaller ones (r = 1 − y)."""
    above = 2.0 * y if user == 0 else 1.0 - y
    return np.where(y <= threshold, y, above)


def two_user_pools(num_pairs: int = 20_000, seed: int = 0, threshold: float = 0.5) -> dict[str, PairPool]:
    """§5.1: options y ~ U[0, 1], two user types, pairs split 80/10/10."""
    utilities = [lambda y, user=user: two_user_reward(y[:, 0], user, threshold) for user in (0, 1)]
    return synthetic_task(uniform_pairs, utilities, num_pairs, seed)


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
    def sample_pairs(rng, num):
        return correlated_options(rng, num, rho), correlated_options(rng, num, rho)

    return synthetic_task(sample_pairs, [lambda y: y[:, 0], lambda y: y[:, 1]], num_pairs, seed)


def correlated_identity(rho: float, num_pairs: int, seed: int) -> dict:
    """What checkpoints and results record about ``correlated_pools(rho, num_pairs, seed)``."""
    return {"name": "synthetic-correlated", "rho": rho, "num_pairs": num_pairs, "seed": seed}


def conflicting_probe_pairs(rho: float, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` option pairs at correlation ρ on which the two user types disagree."""
    rng = np.random.default_rng(seed)
    found_a, found_b, have = [], [], 0
    while have < num:
        a, b = correlated_options(rng, 4 * num, rho), correlated_options(rng, 4 * num, rho)
        conflict = (a[:, 0] > b[:, 0]) != (a[:, 1] > b[:, 1])
        found_a.append(a[conflict])
        found_b.append(b[conflict])
        have += int(conflict.sum())
    return np.concatenate(found_a)[:num], np.concatenate(found_b)[:num]


def bayes_error_single_pair(rho: float) -> float:
    """Bayes-optimal error of inferring z* from one context pair: 1/4 + arcsin(ρ)/(2π)."""
    return 0.25 + float(np.arcsin(rho)) / (2.0 * np.pi)


# Four user types whose ideal points are the corners of a square inside [0, 1]²: no line through
# the types orders them, so their preferences are not one continuum.
IDEAL_POINTS = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))
IDEAL_POINT_NAMES = [f"z={k}" for k in range(len(IDEAL_POINTS))]


def uniform_square_pairs(rng: np.random.Generator, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of options y ~ U[0, 1]²: ``-> ([num, 2], [num, 2])``."""
    options = rng.uniform(0.0, 1.0, size=(num, 4))
    return options[:, :2], options[:, 2:]


def ideal_point_pools(num_pairs: int = 20_000, seed: int = 0) -> dict[str, PairPool]:
    """Four user types, each preferring options nearer its ideal point: u_k(y) = −‖y − c_k‖²
    with c_k the corners of ``IDEAL_POINTS``; pairs split 80/10/10."""
    utilities = [lambda y, c=np.asarray(c): -np.sum((y - c) ** 2, axis=-1) for c in IDEAL_POINTS]
    return synthetic_task(uniform_square_pairs, utilities, num_pairs, seed)


def ideal_point_identity(num_pairs: int, seed: int) -> dict:
    """What checkpoints and results record about ``ideal_point_pools(num_pairs, seed)``."""
    return {"name": "synthetic-four-ideal-points", "num_pairs": num_pairs, "seed": seed,
            "ideal_points": [list(c) for c in IDEAL_POINTS]}
