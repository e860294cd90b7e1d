"""`nps reproduce active`: how many answered pairs a new user needs, asked actively vs at random.

For each task (the synthetic two-user task, and the correlated-option task at ρ = 0.7, where only
a quarter of the pairs conflict), an NP-BTL model is trained as in its experiment. Then simulated
test users (half of each user type) answer pairs from a shared pool of candidate pairs, one at a
time, chosen either at random or by expected information gain over plausible users
(``nps.active``). After every answer the model is conditioned on all answered pairs and scored
on that user's choices on separate evaluation pairs. A user *reaches the target* at the first
number of answers whose accuracy is at least ``target_fraction`` × the model's mean accuracy
after ``reference_pairs`` random answers (the issue's "95 % of the 10-random-pair accuracy");
users who never reach it within ``max_pairs`` count as ``max_pairs + 1``. Reported: pairs needed,
mean ± standard error over users, per strategy, and accuracy vs answered pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.active import most_informative, particle_choice_probabilities, particle_latents, update_log_weights
from nps.config import config_to_dict
from nps.data.episodes import Episodes, EpisodeSpec, PairPool
from nps.data.synthetic import correlated_pools, two_user_pools
from nps.errors import ConfigError
from nps.experiments.report import finish_run, prepare_output_dir, save_figure
from nps.experiments.runner import EvalConfig, train_and_evaluate
from nps.experiments.synthetic import SYNTHETIC_NP_BTL
from nps.likelihood import choice_accuracy
from nps.models.reward import RewardModelConfig
from nps.train.evaluate import mean_and_sem
from nps.train.loop import TrainConfig

TASKS = ("synthetic", "correlation")
STRATEGIES = ("random", "active")


@dataclasses.dataclass(frozen=True)
class ActiveConfig:
    tasks: tuple[str, ...] = TASKS
    correlation_rho: float = 0.7
    num_pairs: int = 20_000
    data_seed: int = 0
    num_users: int = 400  # test users, half of each user type
    num_candidates: int = 200  # the pool a user is asked from (test split)
    num_eval_pairs: int = 200  # each user's unseen pairs (test split, disjoint from the candidates)
    max_pairs: int = 20
    num_particles: int = 512
    particle_context: int = 10
    reference_pairs: int = 10
    target_fraction: float = 0.95
    seed: int = 0
    episodes: EpisodeSpec = EpisodeSpec()
    model: RewardModelConfig = SYNTHETIC_NP_BTL
    synthetic_train: TrainConfig = TrainConfig()
    correlation_train: TrainConfig = TrainConfig(steps=2000, checkpoint_every=200)
    eval: EvalConfig = EvalConfig()

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"tasks={self.tasks}: choose from {list(TASKS)}")
        if self.model.kind != "np":
            raise ConfigError("model.kind must be 'np': choosing pairs needs a context-conditioned model")
        if not 0 < self.reference_pairs <= self.max_pairs:
            raise ConfigError(f"reference_pairs={self.reference_pairs} must be in 1..max_pairs={self.max_pairs}")
        if self.num_users < 4 or self.num_users % 2:
            raise ConfigError(f"num_users={self.num_users} must be an even number ≥ 4 (half per user type)")
        if self.num_candidates < self.max_pairs:
            raise ConfigError(f"num_candidates={self.num_candidates} must be at least max_pairs={self.max_pairs}")
        if not 0 < self.target_fraction <= 1:
            raise ConfigError(f"target_fraction={self.target_fraction} must be in (0, 1]")
        self.episodes.validate()
        self.synthetic_train.validate("synthetic_train")
        self.correlation_train.validate("correlation_train")
        self.eval.validate()
        self.model.validate("model")


def _take(pool: PairPool, index: np.ndarray) -> PairPool:
    return PairPool(*(x[index] for x in pool))


def _label(pool: PairPool, user_weights: jax.Array) -> jax.Array:
    """[U, M] True where each user prefers option a of each pair (ties: option a)."""
    return (user_weights @ pool.utility_a.T) >= (user_weights @ pool.utility_b.T)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _accuracy(graphdef, params, chosen, rejected, mask, evaluation: PairPool, eval_first: jax.Array,
              user_weights: jax.Array):
    """Accuracy [U] on the evaluation pairs of the model conditioned on each user's answered pairs."""
    num_users = user_weights.shape[0]
    a = jnp.broadcast_to(evaluation.option_a, (num_users, *evaluation.option_a.shape))
    b = jnp.broadcast_to(evaluation.option_b, (num_users, *evaluation.option_b.shape))
    target_chosen = jnp.where(eval_first[..., None], a, b)
    target_rejected = jnp.where(eval_first[..., None], b, a)
    episodes = Episodes(chosen, rejected, mask, target_chosen, target_rejected, jnp.ones(eval_first.shape, bool),
                        jnp.zeros(eval_first.shape, bool), jnp.argmax(user_weights, -1), user_weights)
    log_odds = nnx.merge(graphdef, params).predict_log_odds(episodes, jax.random.key(0))
    return choice_accuracy(log_odds, episodes.unseen_mask)


def answer_curves(fit, candidates: PairPool, evaluation: PairPool, user_weights: jax.Array, particles: jax.Array,
                  strategy: str, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy [U, max_pairs + 1] after 0..max_pairs answers, and the asked candidate ids [U, max_pairs]."""
    model = fit.model()
    num_users, num_candidates = user_weights.shape[0], candidates.num_pairs
    probabilities = particle_choice_probabilities(model, particles, candidates.option_a, candidates.option_b)
    first_chosen = _label(candidates, user_weights)
    eval_first = _label(evaluation, user_weights)
    random_order = jax.vmap(lambda k: jax.random.permutation(k, num_candidates))(
        jax.random.split(jax.random.key(seed), num_users))
    dim = candidates.option_a.shape[-1]
    chosen = jnp.zeros((num_users, max_pairs, dim))
    rejected = jnp.zeros((num_users, max_pairs, dim))
    mask = jnp.zeros((num_users, max_pairs), bool)
    log_weights = jnp.zeros((num_users, particles.shape[0]))
    asked_mask = jnp.zeros((num_users, num_candidates), bool)
    users = jnp.arange(num_users)
    accuracy, asked = [], []
    for n in range(max_pairs + 1):
        accuracy.append(_accuracy(fit.graphdef, fit.params, chosen, rejected, mask, evaluation, eval_first,
                                  user_weights))
        if n == max_pairs:
            break
        index = random_order[:, n] if strategy == "random" else most_informative(log_weights, probabilities,
                                                                                  asked_mask)
        first = first_chosen[users, index]
        a, b = candidates.option_a[index], candidates.option_b[index]
        chosen = chosen.at[:, n].set(jnp.where(first[:, None], a, b))
        rejected = rejected.at[:, n].set(jnp.where(first[:, None], b, a))
        mask = mask.at[:, n].set(True)
        log_weights = update_log_weights(log_weights, probabilities, index, first)
        asked_mask = asked_mask.at[users, index].set(True)
        asked.append(index)
    return np.stack([np.asarray(x) for x in accuracy], axis=1), np.stack([np.asarray(x) for x in asked], axis=1)


def pairs_needed(accuracy: np.ndarray, target: float) -> np.ndarray:
    """Per user [U]: the first number of answers whose accuracy ≥ target (max_pairs + 1 if never)."""
    reached = accuracy >= target
    return np.where(reached.any(axis=1), reached.argmax(axis=1), accuracy.shape[1])


def _task_pools(task: str, config: ActiveConfig) -> tuple[dict[str, PairPool], dict[str, Any]]:
    if task == "synthetic":
        return two_user_pools(config.num_pairs, config.data_seed), {"name": "synthetic-two-user",
                                                                    "num_pairs": config.num_pairs,
                                                                    "seed": config.data_seed, "threshold": 0.5}
    return correlated_pools(config.correlation_rho, config.num_pairs, config.data_seed), {
        "name": "synthetic-correlated", "rho": config.correlation_rho, "num_pairs": config.num_pairs,
        "seed": config.data_seed}


def run_active(config: ActiveConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
               echo=print) -> dict[str, Any]:
    config.validate()
    start = time.perf_counter()
    out = prepare_output_dir(out, fresh)
    tasks, models = {}, {}
    for task in config.tasks:
        pools, identity = _task_pools(task, config)
        train = config.synthetic_train if task == "synthetic" else config.correlation_train
        option_dim = pools["train"].option_a.shape[-1]
        fit, models[f"np_btl_{task}"] = train_and_evaluate(
            f"np_btl_{task}", config.model, option_dim, pools, config.episodes, train, config.eval, out,
            ["z=0", "z=1"], data_identity=identity, progress=progress)
        order = np.random.default_rng(config.seed).permutation(pools["test"].num_pairs)
        candidates = _take(pools["test"], order[: config.num_candidates])
        evaluation = _take(pools["test"], order[config.num_candidates : config.num_candidates + config.num_eval_pairs])
        user_weights = jax.nn.one_hot(jnp.arange(config.num_users) % 2, 2)
        particles = particle_latents(fit.model(), pools["val"], config.episodes, config.num_particles,
                                     config.particle_context, config.seed)
        curves = {s: answer_curves(fit, candidates, evaluation, user_weights, particles, s, config.max_pairs,
                                   config.seed + 1)[0] for s in STRATEGIES}
        target = config.target_fraction * float(curves["random"][:, config.reference_pairs].mean())
        needed = {s: pairs_needed(curves[s], target) for s in STRATEGIES}
        tasks[task] = {
            "target_accuracy": target,
            "reference_accuracy": float(curves["random"][:, config.reference_pairs].mean()),
            "pairs_needed": {s: mean_and_sem(needed[s]) | {"never_reached": int(np.sum(needed[s] > config.max_pairs))}
                             for s in STRATEGIES},
            "ratio_active_to_random": float(needed["active"].mean() / needed["random"].mean()),
            "accuracy_vs_pairs": {s: [mean_and_sem(curves[s][:, n]) for n in range(config.max_pairs + 1)]
                                  for s in STRATEGIES},
        }
    plots = [plot_active(tasks, out / "accuracy_vs_answered_pairs.png")]
    return finish_run(out, start, echo, tables=[format_active_table(tasks)], plots=plots, experiment="active",
                      config=config_to_dict(config), tasks=tasks, models=models, user_types=["z=0", "z=1"])


def format_active_table(tasks: dict[str, Any]) -> str:
    header = f"{'task':<14}{'target acc.':>12}{'random: pairs':>18}{'active: pairs':>18}{'active/random':>15}"
    lines = [header, "-" * len(header)]
    for name, task in tasks.items():
        r, a = task["pairs_needed"]["random"], task["pairs_needed"]["active"]
        lines.append(f"{name:<14}{100 * task['target_accuracy']:>11.1f}%{r['mean']:>11.2f} ± {r['sem']:<4.2f}"
                     f"{a['mean']:>11.2f} ± {a['sem']:<4.2f}{task['ratio_active_to_random']:>15.2f}")
    return "\n".join(lines)


def plot_active(tasks: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items()):
        for strategy, curve in task["accuracy_vs_pairs"].items():
            ax.errorbar(range(len(curve)), [100 * c["mean"] for c in curve], yerr=[100 * c["sem"] for c in curve],
                        marker="o", markersize=3, capsize=2, label=strategy)
        ax.axhline(100 * task["target_accuracy"], color="grey", linestyle="--", label="target")
        ax.set_title(name)
        ax.set_xlabel("answered pairs")
        ax.set_ylabel("accuracy on the user's unseen pairs [%]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
