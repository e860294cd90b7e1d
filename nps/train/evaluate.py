"""Accuracy on unseen target pairs, per user type and context size, with standard errors."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.data.episodes import Episodes, EpisodeSpec, PairPool, sample_episodes
from nps.likelihood import choice_accuracy

PAPER_CONTEXT_SIZES = (0, 1, 3, 5, 10)


def mean_and_sem(values: np.ndarray) -> dict[str, float]:
    """Mean, standard error of the mean (ddof = 1) and count of per-task values."""
    values = np.asarray(values, np.float64)
    sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "sem": sem, "num_tasks": int(len(values))}


def summarise_by_user(per_task: np.ndarray, user: np.ndarray, user_names: Sequence[str]) -> dict[str, Any]:
    """{user name: mean/sem/num_tasks, ..., "all": ...} from per-task values (groups without tasks left out)."""
    summary = {name: mean_and_sem(per_task[user == k]) for k, name in enumerate(user_names) if np.any(user == k)}
    summary["all"] = mean_and_sem(per_task)
    return summary


def by_user_type(user_names: Sequence[str]) -> Callable[[np.ndarray], tuple[np.ndarray, Sequence[str]]]:
    """Group tasks by user type (the largest weight), named ``user_names``."""
    return lambda user_weights: (np.argmax(user_weights, axis=-1), user_names)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "num_tasks", "sample"))
def _unseen_accuracy(graphdef, frozen, params, pool, key, context_size, *, spec, num_tasks, sample):
    episodes = sample(key, pool, spec, num_tasks, context_size)
    log_odds = nnx.merge(graphdef, frozen, params).predict_log_odds(episodes, jax.random.fold_in(key, 1))
    return choice_accuracy(log_odds, episodes.unseen_mask), episodes.user_weights


def evaluate_unseen_accuracy(
    graphdef,
    params,
    pool: PairPool,
    spec: EpisodeSpec,
    user_names: Sequence[str],
    context_sizes: Sequence[int] = PAPER_CONTEXT_SIZES,
    num_tasks: int = 2000,
    seed: int = 0,
    batch_size: int = 500,
    frozen: Any = None,
    group_by: Callable[[np.ndarray], tuple[np.ndarray, Sequence[str]]] | None = None,
    sample: Callable[..., Episodes] = sample_episodes,
) -> dict[str, dict[str, Any]]:
    """Unseen-target accuracy (𝒟^T \\ 𝒟^C only) for each N^C in ``context_sizes``.

    Every N^C sees the same users and targets (the same keys), with nested
    contexts, so differences across N^C are not sampling noise. One compiled
    function serves all N^C. ``frozen``: a ``FitResult.frozen`` (the base LM of a
    policy). ``group_by(user_weights [n, K]) -> (group [n], names)`` sets the rows
    (default: user types named ``user_names``); ``sample(key, pool, spec, num_tasks,
    context_size)`` draws the tasks (default ``sample_episodes``; a module-level function,
    as it is a compile-time constant). Returns ``{str(N^C): summarise_by_user(...)}``.
    """
    group_by = group_by or by_user_type(user_names)
    frozen = {} if frozen is None else frozen
    if max(context_sizes) > spec.max_context:
        spec = dataclasses.replace(spec, max_context=max(context_sizes))
    spec.validate()
    num_batches = -(-num_tasks // batch_size)
    keys = [jax.random.fold_in(jax.random.key(seed), b) for b in range(num_batches)]
    results = {}
    for size in context_sizes:
        accuracy, user_weights = zip(
            *(
                _unseen_accuracy(graphdef, frozen, params, pool, k, jnp.int32(size), spec=spec, num_tasks=batch_size,
                                 sample=sample)
                for k in keys
            )
        )
        accuracy, user_weights = np.concatenate(accuracy)[:num_tasks], np.concatenate(user_weights)[:num_tasks]
        results[str(size)] = summarise_by_user(accuracy, *group_by(user_weights))
    return results
