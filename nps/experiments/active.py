"""`nps reproduce active`: how many answered pairs a new user needs, asked actively vs at random.

Three tasks: the synthetic two-user task, the correlated-option task at ρ = 0.7 (only a quarter
of the pairs conflict), each with NP-BTL trained as in its experiment; and the steering task's
NP-DPO policy (its implicit reward; trained by `nps reproduce steering`, or reused from
``steering_run``). Simulated test users (half of each user type) answer pairs from a shared pool
of candidate pairs, one at a time, chosen either at random or by expected information gain over
plausible users (``nps.active``). After every answer the model is conditioned on all answered
pairs and scored on that user's choices on separate evaluation pairs (disjoint from the
candidates). A user *reaches the target* at the first number of answers whose accuracy is at
least ``target_fraction`` × the model's mean accuracy after ``reference_pairs`` random answers
(the issue's "95 % of the 10-random-pair accuracy"); users who never reach it within
``max_pairs`` count as ``max_pairs + 1``. Reported per task: pairs needed, mean ± standard error
over users, per strategy, their ratio, and accuracy vs answered pairs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nps.active import answer_curves, pairs_needed, particle_latents
from nps.data.episodes import EpisodeSpec
from nps.data.pairs import AnsweredPairs, OptionPairPool, PairPool, answer_pairs
from nps.data.synthetic import (
    TWO_USER_NAMES,
    correlated_identity,
    correlated_pools,
    two_user_identity,
    two_user_pools,
)
from nps.errors import ConfigError, invalid
from nps.experiments.steering import trained_run
from nps.steering_run import stored_pairs
from nps.models.reward import SYNTHETIC_NP_BTL, RewardModelConfig
from nps.results import ExperimentRun, experiment_run, save_figure
from nps.train.evaluate import check_unseen_targets, mean_and_sem
from nps.train.logging import LogConfig
from nps.train.loop import TrainConfig
from nps.train.evaluate import EvalConfig

TASKS = ("synthetic", "correlation", "steering")
STRATEGIES = ("random", "active")


@dataclasses.dataclass(frozen=True)
class ActiveConfig:
    tasks: tuple[str, ...] = TASKS
    correlation_rho: float = 0.7
    num_pairs: int = 20_000
    data_seed: int = 0
    num_users: int = 400  # test users per task, half of each user type
    steering_users: int = 100  # the policy scores every evaluation response: fewer users there
    num_candidates: int = 200  # the pool a user is asked from (test split; at most half of it)
    num_eval_pairs: int = 200  # each user's unseen pairs (the rest of the test split, up to this many)
    max_pairs: int = 20
    num_particles: int = 512
    particle_context: int = 10
    reference_pairs: int = 10
    target_fraction: float = 0.95
    seed: int = 0
    steering_run: str = ""  # a `nps reproduce steering` folder; "" trains one under <out>/steering
    episodes: EpisodeSpec = EpisodeSpec()
    model: RewardModelConfig = SYNTHETIC_NP_BTL
    synthetic_train: TrainConfig = TrainConfig()
    correlation_train: TrainConfig = TrainConfig(steps=2000, checkpoint_every=200)
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()  # training curves, evaluation, plots, traces: --set log.backend=...

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise invalid("tasks", self.tasks, f"must choose from {list(TASKS)}")
        if self.model.kind != "np":
            raise invalid("model.kind", self.model.kind,
                          "must be 'np': choosing pairs needs a context-conditioned model")
        if not 0 < self.reference_pairs <= self.max_pairs:
            raise invalid("reference_pairs", self.reference_pairs, f"must be in 1..max_pairs={self.max_pairs}")
        for name in ("num_users", "steering_users"):
            if getattr(self, name) < 4 or getattr(self, name) % 2:
                raise invalid(name, getattr(self, name), "must be an even number ≥ 4 (half per user type)")
        if self.num_candidates < self.max_pairs:
            raise invalid("num_candidates", self.num_candidates, f"must be at least max_pairs={self.max_pairs}")
        if not 0 < self.target_fraction <= 1:
            raise invalid("target_fraction", self.target_fraction, "must be in (0, 1]")
        check_unseen_targets(self.eval.context_sizes, self.episodes)


def _pair_sets(test: PairPool | OptionPairPool, config: ActiveConfig,
               num_users: int) -> tuple[AnsweredPairs, AnsweredPairs]:
    """Candidates and evaluation pairs from a test split, answered by users of alternating types."""
    count = test.num_pairs
    num_candidates = min(config.num_candidates, count // 2)
    if num_candidates < config.max_pairs:
        raise ConfigError(f"the test split has {count} pairs: too few for {config.max_pairs} questions and "
                          "separate evaluation pairs; lower max_pairs")
    order = np.random.default_rng(config.seed).permutation(count)
    parts = order[:num_candidates], order[num_candidates : num_candidates + config.num_eval_pairs]
    user_weights = jax.nn.one_hot(jnp.arange(num_users) % 2, 2)
    ties = jax.random.split(jax.random.key(config.seed), 2)  # the coins for any pair a user is indifferent about
    candidates, evaluation = (answer_pairs(test.take(index), user_weights, key) for index, key in zip(parts, ties))
    return candidates, evaluation


def _task(task: str, config: ActiveConfig, run: ExperimentRun):
    """(model, its results entry or None, candidates, evaluation, population pool for the particles)."""
    if task == "steering":
        steering = trained_run(config.steering_run, run.out, run.progress, run.echo)
        pairs = stored_pairs(steering.directory)
        # Candidates as sampling produces them: conflicting pairs and pairs both users rank alike.
        pools = pairs.pools("all")
        candidates, evaluation = _pair_sets(OptionPairPool(pools["test"], pairs.options), config,
                                            config.steering_users)
        return steering.policy, None, candidates, evaluation, OptionPairPool(pools["val"], pairs.options)
    if task == "synthetic":
        pools = two_user_pools(config.num_pairs, config.data_seed)
        identity = two_user_identity(config.num_pairs, config.data_seed)
    else:
        pools = correlated_pools(config.correlation_rho, config.num_pairs, config.data_seed)
        identity = correlated_identity(config.correlation_rho, config.num_pairs, config.data_seed)
    train = config.synthetic_train if task == "synthetic" else config.correlation_train
    fit, entry = run.fit_and_evaluate_reward_model(
        f"np_btl_{task}", config.model, pools, data_identity=identity, train=train, episodes=config.episodes,
        user_names=TWO_USER_NAMES)
    candidates, evaluation = _pair_sets(pools["test"], config, config.num_users)
    return fit.model(), entry, candidates, evaluation, pools["val"]


def run_active(config: ActiveConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
               echo=print) -> dict[str, Any]:
    with experiment_run("active", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        out = run.out
        tasks, models = {}, {}
        for task in config.tasks:
            model, entry, candidates, evaluation, population = _task(task, config, run)
            if entry is not None:
                models[f"np_btl_{task}"] = entry
            particles = particle_latents(model, population, config.episodes, config.num_particles,
                                         config.particle_context, jax.random.key(config.seed))
            curves = {s: answer_curves(model, candidates, evaluation, particles, s, config.max_pairs,
                                       jax.random.key(config.seed + 1))[0]
                      for s in STRATEGIES}
            reference = float(curves["random"][:, config.reference_pairs].mean())
            target = config.target_fraction * reference
            needed = {s: pairs_needed(curves[s], target) for s in STRATEGIES}
            tasks[task] = {
                "target_accuracy": target,
                "reference_accuracy": reference,
                "num_users": int(candidates.first_chosen.shape[0]),
                "num_candidates": int(candidates.first_chosen.shape[1]),
                "num_eval_pairs": int(evaluation.first_chosen.shape[1]),
                "pairs_needed": {s: mean_and_sem(needed[s])
                                 | {"never_reached": int(np.sum(needed[s] > config.max_pairs))}
                                 for s in STRATEGIES},
                "ratio_active_to_random": float(needed["active"].mean() / needed["random"].mean()),
                "accuracy_vs_pairs": {s: [mean_and_sem(curves[s][:, n]) for n in range(config.max_pairs + 1)]
                                      for s in STRATEGIES},
            }
        plots = [plot_active(tasks, out / "accuracy_vs_answered_pairs.png")]
        return run.finish(tables=[format_active_table(tasks)], plots=plots, tasks=tasks, models=models,
                          user_types=TWO_USER_NAMES)


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
