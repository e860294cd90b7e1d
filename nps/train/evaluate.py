"""Accuracy on unseen target pairs, per user type and context size, with standard errors.

Every function here takes a preference model as ``nps.models.interface`` says: the model itself."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.data.episodes import Episodes, EpisodeSpec, sample_episodes
from nps.data.pairs import PairPool
from nps.errors import ConfigError, invalid
from nps.likelihood import choice_accuracy, choice_correct
from nps.models.interface import PerUserRewardModel, PreferenceModel, check_model
from nps.train.distributed import alongside, host_value

PAPER_CONTEXT_SIZES = (0, 1, 3, 5, 10)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Test-time tasks: N^T as in training, N^C from ``context_sizes`` (the paper's by default)."""

    context_sizes: tuple[int, ...] = PAPER_CONTEXT_SIZES
    num_tasks: int = 2000
    seed: int = 1

    def __post_init__(self):
        if not self.context_sizes or min(self.context_sizes) < 0:
            raise invalid("context_sizes", self.context_sizes, "must be non-negative sizes")
        if self.num_tasks < 2:
            raise invalid("num_tasks", self.num_tasks, "must be at least 2 (for a standard error)")


def check_unseen_targets(context_sizes: Sequence[int], spec: EpisodeSpec, field: str = "eval.context_sizes") -> None:
    """Every N^C leaves at least one target unseen (the context is a subset of the targets), so no
    accuracy is ever a mean over nothing."""
    largest = max(context_sizes)
    if largest >= spec.num_targets:
        raise ConfigError(
            f"{field}={list(context_sizes)} has N^C={largest} but the test tasks have num_targets={spec.num_targets}: "
            f"no unseen target would be left to score; use N^C < {spec.num_targets}",
            field,
        )


def mean_and_sem(values: np.ndarray) -> dict[str, float]:
    """Mean, standard error of the mean (ddof = 1) and count of per-task values."""
    values = np.asarray(values, np.float64)
    if not len(values):
        raise ValueError("a mean over no values is not a number; there is nothing to report")
    sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "sem": sem, "num_tasks": int(len(values))}


def pairwise_wins(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """1 where ours scores higher, ½ on a tie, 0 where theirs does (paired comparisons, any shape)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    return ((ours > theirs) + 0.5 * (ours == theirs)).astype(np.float64)


def win_rate(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """P(ours > theirs) + ½ P(tie), mean ± s.e. over the paired comparisons."""
    return mean_and_sem(pairwise_wins(ours, theirs))


def summarise_by_user(per_task: np.ndarray, user: np.ndarray, user_names: Sequence[str]) -> dict[str, Any]:
    """{user name: mean/sem/num_tasks, ..., "all": ...} from per-task values (groups without tasks left out)."""
    summary = {name: mean_and_sem(per_task[user == k]) for k, name in enumerate(user_names) if np.any(user == k)}
    summary["all"] = mean_and_sem(per_task)
    return summary


def by_user_type(user_names: Sequence[str]) -> Callable[[np.ndarray], tuple[np.ndarray, Sequence[str]]]:
    """Group tasks by user type (the largest weight), named ``user_names``."""
    return lambda user_weights: (np.argmax(user_weights, axis=-1), user_names)


def weight_cells(num_attributes: int, bins: int):
    """``group_by`` for continuum users, and each group's centre in weight space.

    2-D: ``bins`` equal bins of w₀ (Fig. 8a); 3-D: cells of (w₀, w₁) on a ``bins`` × ``bins``
    grid (only those inside the simplex can hold users; Fig. 8b).
    """
    def index(w):
        return np.minimum((w * bins).astype(int), bins - 1)

    edges = np.linspace(0.0, 1.0, bins + 1)
    centre = (edges[:-1] + edges[1:]) / 2
    if num_attributes == 2:
        names = [f"w0 {edges[i]:.2f}-{edges[i + 1]:.2f}" for i in range(bins)]
        return (lambda weights: (index(weights[:, 0]), names)), {n: (centre[i],) for i, n in enumerate(names)}
    cells = [(i, j) for i in range(bins) for j in range(bins)]
    names = [f"w0 {edges[i]:.2f}-{edges[i + 1]:.2f}, w1 {edges[j]:.2f}-{edges[j + 1]:.2f}" for i, j in cells]
    centres = {n: (centre[i], centre[j]) for n, (i, j) in zip(names, cells)}
    return (lambda weights: (index(weights[:, 0]) * bins + index(weights[:, 1]), names)), centres


def evaluate_unseen_accuracy(
    model: PreferenceModel,
    pool: PairPool,
    spec: EpisodeSpec,
    user_names: Sequence[str],
    context_sizes: Sequence[int] = PAPER_CONTEXT_SIZES,
    num_tasks: int = 2000,
    seed: int = 0,
    batch_size: int = 500,
    group_by: Callable[[np.ndarray], tuple[np.ndarray, Sequence[str]]] | None = None,
    sample: Callable[..., Episodes] = sample_episodes,
) -> dict[str, dict[str, Any]]:
    """Unseen-target accuracy (𝒟^T \\ 𝒟^C only) of any preference model for each N^C in ``context_sizes``.

    Every N^C sees the same users and targets (the same keys), with nested
    contexts, so differences across N^C are not sampling noise. One compiled
    function serves all N^C. ``group_by(user_weights [n, K]) -> (group [n], names)`` sets the rows
    (default: user types named ``user_names``); ``sample(key, pool, spec, num_tasks,
    context_size)`` draws the tasks (default ``sample_episodes``; a module-level function,
    as it is a compile-time constant). Returns ``{str(N^C): summarise_by_user(...)}``.
    """
    check_model(model)
    check_unseen_targets(context_sizes, spec, "context_sizes")
    group_by = group_by or by_user_type(user_names)
    graphdef, state = nnx.split(model)
    pool = alongside(pool, state)  # on the devices the parameters span (several, in a multi-device run)
    spec = spec.for_context(max(context_sizes))
    batch_size = min(batch_size, num_tasks)  # a few tasks are not computed as a whole batch and cut
    num_batches = -(-num_tasks // batch_size)
    keys = [jax.random.fold_in(jax.random.key(seed), b) for b in range(num_batches)]
    on_device = {
        size: [_unseen_accuracy(graphdef, state, pool, k, jnp.int32(size), spec=spec, num_tasks=batch_size,
                                sample=sample) for k in keys]
        for size in context_sizes
    }
    results = {}
    for size, batches in host_value(on_device).items():  # one host transfer for every N^C
        accuracy, user_weights = (np.concatenate(part)[:num_tasks] for part in zip(*batches))
        results[str(size)] = summarise_by_user(accuracy, *group_by(user_weights))
    return results


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "num_tasks", "sample"))
def _unseen_accuracy(graphdef, state, pool, key, context_size, *, spec, num_tasks, sample):
    episodes = sample(key, pool, spec, num_tasks, context_size)
    log_odds = nnx.merge(graphdef, state).predict_log_odds(episodes, jax.random.fold_in(key, 1))
    return choice_accuracy(log_odds, episodes.unseen_mask), episodes.user_weights


def rewards_given_context(model: PerUserRewardModel, pool: PairPool, spec: EpisodeSpec, options, num_tasks: int,
                          key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """A per-user reward model's rewards of ``options`` [N, D] for ``num_tasks`` users of ``pool``,
    each known by ``spec.max_context`` of their pairs: (rewards [num_tasks, N], user type [num_tasks])."""
    check_model(model, PerUserRewardModel)
    graphdef, state = nnx.split(model)
    pool, options = alongside((pool, jnp.asarray(options, jnp.float32)), state)
    return host_value(_rewards_given_context(graphdef, state, pool, options, key, spec=spec, num_tasks=num_tasks))


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "num_tasks"))
def _rewards_given_context(graphdef, state, pool, options, key, *, spec, num_tasks):
    episodes = sample_episodes(key, pool, spec, num_tasks, spec.max_context)
    model = nnx.merge(graphdef, state)
    return model.reward(options[None], model.context_latent(episodes)), episodes.user


def identification_errors(model: PreferenceModel, pool: PairPool, probe_a, probe_b, spec: EpisodeSpec,
                          num_tasks: int, num_probes: int, key: jax.Array,
                          batch_size: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """How well a model identifies a user of two types from one context pair (paper Example 4.3).

    For ``num_tasks`` test tasks of ``pool`` with N^C = 1: condition on the context pair, score
    ``num_probes`` probes drawn from ``probe_a``/``probe_b`` [M, D] (pairs on which the two types
    disagree), and let ẑ be the type whose choices the model reproduces on more of them (a fair
    coin on a tie). Returns per task the 0/1 error of ẑ and the error rate on the probes judged
    by the task's true type, each [num_tasks] (float64). Batches share keys whatever the total.
    """
    check_model(model)
    graphdef, state = nnx.split(model)
    pool, probe_a, probe_b = alongside((pool, jnp.asarray(probe_a, jnp.float32), jnp.asarray(probe_b, jnp.float32)),
                                       state)
    batch = min(num_tasks, batch_size)
    z_errors, pair_errors = map(np.concatenate, zip(*host_value([
        _identification_errors(graphdef, state, pool, probe_a, probe_b, jax.random.fold_in(key, b), spec=spec,
                               num_tasks=batch, num_probes=num_probes)
        for b in range(-(-num_tasks // batch))
    ])))
    return z_errors[:num_tasks].astype(np.float64), pair_errors[:num_tasks].astype(np.float64)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "num_tasks", "num_probes"))
def _identification_errors(graphdef, state, pool, probe_a, probe_b, key, *, spec, num_tasks, num_probes):
    """Per task: 0/1 error of ẑ from one context pair, and the error rate on the probes."""
    key_tasks, key_probes, key_model, key_coin = jax.random.split(key, 4)
    episodes = sample_episodes(key_tasks, pool, spec, num_tasks, context_size=1)
    index = jax.random.randint(key_probes, (num_tasks, num_probes), 0, probe_a.shape[0])
    a, b = probe_a[index], probe_b[index]
    probes = episodes._replace(
        target_chosen=a,  # "chosen" = a: the log-odds below are of a over b
        target_rejected=b,
        target_mask=jnp.ones((num_tasks, num_probes), bool),
        target_in_context=jnp.zeros((num_tasks, num_probes), bool),
    )
    log_odds = nnx.merge(graphdef, state).predict_log_odds(probes, key_model)
    user0_prefers_a = jnp.where(a[..., 0] > b[..., 0], 1.0, -1.0)
    agreement_with_user0 = jnp.mean(choice_correct(log_odds * user0_prefers_a), axis=-1)
    coin = jax.random.bernoulli(key_coin, 0.5, (num_tasks,)).astype(jnp.int32)
    z_hat = jnp.where(agreement_with_user0 > 0.5, 0, jnp.where(agreement_with_user0 < 0.5, 1, coin))
    agreement_with_true_user = jnp.where(episodes.user == 0, agreement_with_user0, 1.0 - agreement_with_user0)
    return (z_hat != episodes.user).astype(jnp.float32), 1.0 - agreement_with_true_user


def summarise_over_seeds(runs: Sequence[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Accuracy per N^C and user group over independently trained seeds: the mean and standard error of
    the seeds' means (``num_tasks`` counts the seeds), from each seed's ``evaluate_unseen_accuracy``."""
    return {size: {group: mean_and_sem(np.array([run[size][group]["mean"] for run in runs]))
                   for group in runs[0][size]}
            for size in runs[0]}
