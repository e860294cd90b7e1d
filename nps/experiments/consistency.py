"""`nps reproduce consistency`: how well the profile checks find drift and mistaken answers.

Simulated users of known type answer pairs from a task's test split; ``nps.workflow.consistency``
checks their profiles with the task's trained model (NP-BTL on the synthetic two-user task,
NP-DPO's implicit reward on the steering task). Three kinds of user, ``num_users`` of each per
task and candidate set:

- **stable**: one type for all ``answers`` answers; drift is tested once on the whole profile
  (the false-alarm rate);
- **switching**: one type for ``switch_after`` answers, the other type after; drift is tested on
  the profile after each answer from the switch on (as the Profile page would on every visit),
  up to ``answers`` in all: the share flagged at the last look, the share flagged at any look,
  the first look that flags, and whether the drift is placed within two answers of the switch;
- **careless**: ``flip_answers`` answers of which ``flipped`` are reversed at random: the share
  of profiles whose flipped answers are the least plausible ones by leave-one-out.

Candidates are either the pairs on which the two user types disagree (``conflicting``; a pair
both types rank alike says nothing about who answers it) or all of the split's pairs (``all``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from nps.data.episodes import EpisodeSpec
from nps.data.pairs import AnsweredPairs, OptionPairPool, PairPool, answer_pairs, take_rows
from nps.data.synthetic import TWO_USER_NAMES, two_user_identity, two_user_pools
from nps.errors import invalid
from nps.experiments.steering import trained_run
from nps.steering_run import stored_pairs
from nps.models.reward import SYNTHETIC_NP_BTL, RewardModelConfig
from nps.results import ExperimentRun, experiment_run
from nps.train.evaluate import mean_and_sem
from nps.train.loop import TrainConfig
from nps.train.evaluate import EvalConfig
from nps.workflow.consistency import ALERT_THRESHOLD, drift_test, leave_one_out

TASKS = ("synthetic", "steering")
CANDIDATE_SETS = ("conflicting", "all")


@dataclasses.dataclass(frozen=True)
class ConsistencyConfig:
    tasks: tuple[str, ...] = TASKS
    candidate_sets: tuple[str, ...] = CANDIDATE_SETS
    num_users: int = 100  # of each kind, per task and candidate set
    steering_users: int = 50  # NP-DPO scores every answer with its language model: fewer users there
    answers: int = 20
    switch_after: int = 10
    flip_answers: int = 15
    flipped: int = 2
    threshold: float = ALERT_THRESHOLD
    permutations: int = 99
    window: int = 24
    min_segment: int = 3
    seed: int = 0
    num_pairs: int = 20_000
    data_seed: int = 0
    steering_run: str = ""  # a `nps reproduce steering` folder; "" trains one under <out>/steering
    model: RewardModelConfig = SYNTHETIC_NP_BTL
    synthetic_train: TrainConfig = TrainConfig()
    episodes: EpisodeSpec = EpisodeSpec()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            raise invalid("tasks", self.tasks, f"must choose from {list(TASKS)}")
        if not self.candidate_sets or any(c not in CANDIDATE_SETS for c in self.candidate_sets):
            raise invalid("candidate_sets", self.candidate_sets, f"must choose from {list(CANDIDATE_SETS)}")
        if not 2 * self.min_segment <= self.switch_after < self.answers:
            raise invalid("switch_after", self.switch_after, f"must leave room for drift: 2·min_segment ≤ "
                          f"switch_after < answers={self.answers}")
        if not 0 < self.flipped < self.flip_answers:
            raise invalid("flipped", self.flipped, f"must be in 1..flip_answers-1={self.flip_answers - 1}")
        for name in ("num_users", "steering_users"):
            if getattr(self, name) < 2:
                raise invalid(name, getattr(self, name), "must be at least 2")


class _Task(NamedTuple):
    """A task's model, the largest context it was trained on, and its candidate pairs as each of the two
    user types answers them (``AnsweredPairs`` with one row per type: the simulated users' answers)."""

    model: Any
    trained_context: int
    candidates: AnsweredPairs

    def subset(self, which: str) -> _Task:
        if which == "all":
            return self
        first = np.asarray(self.candidates.first_chosen)
        return self._replace(candidates=self.candidates.take(np.flatnonzero(first[0] != first[1])))


def _study(task: _Task, config: ConsistencyConfig, num_users: int, rng: np.random.Generator,
           echo=lambda *_: None) -> dict[str, Any]:
    settings = {"threshold": config.threshold, "permutations": config.permutations, "window": config.window,
                "min_segment": config.min_segment}
    started = time.perf_counter()
    stable, switched, any_look, delay, placed, found, checks = [], [], [], [], [], [], 0
    for user in range(num_users):
        first_type = user % 2
        stable_profile = task.candidates.profile(rng, np.full(config.answers, first_type))
        drift = drift_test(task.model, *stable_profile, seed=user, **settings)
        stable.append(drift.flagged)
        types = np.where(np.arange(config.answers) < config.switch_after, first_type, 1 - first_type)
        chosen, rejected = task.candidates.profile(rng, types)
        first_flag = None
        for count in range(config.switch_after + config.min_segment, config.answers + 1):
            if first_flag is not None and count < config.answers:
                continue  # flagged once: only the last look is still needed
            looked_at = (take_rows(chosen, slice(count)), take_rows(rejected, slice(count)))
            drift = drift_test(task.model, *looked_at, seed=user, **settings)
            checks += 1
            if drift.flagged and first_flag is None:
                first_flag = count - config.switch_after
                placed.append(abs(drift.change_at - config.switch_after) <= 2)
        switched.append(drift.flagged)
        any_look.append(first_flag is not None)
        delay.append(first_flag if first_flag is not None else config.answers - config.switch_after + 1)
        flipped = rng.choice(config.flip_answers, config.flipped, replace=False)
        careless = task.candidates.profile(rng, np.full(config.flip_answers, first_type), mistakes=flipped)
        probabilities = leave_one_out(task.model, *careless, trained_context=task.trained_context)
        found.append(set(np.argsort(probabilities)[: config.flipped].tolist()) == set(flipped.tolist()))
        if (user + 1) % 10 == 0:
            echo(f"  {user + 1}/{num_users} users, {time.perf_counter() - started:.0f} s")
    rate = lambda values: mean_and_sem(np.asarray(values, np.float64))  # noqa: E731
    return {
        "num_users": num_users, "num_candidates": task.candidates.num_pairs,
        "stable_flagged": rate(stable),
        "switching_flagged_at_last_look": rate(switched),
        "switching_flagged_at_any_look": rate(any_look),
        "answers_after_switch_to_first_flag": rate(delay),
        "drift_placed_within_2_answers": rate(placed) if placed else None,
        "flipped_are_least_plausible": rate(found),
        "seconds": time.perf_counter() - started,
        "drift_tests": checks + num_users,
    }


def _synthetic(config: ConsistencyConfig, run: ExperimentRun) -> tuple[_Task, dict[str, Any]]:
    pools = two_user_pools(config.num_pairs, config.data_seed)
    fit, entry = run.fit_and_evaluate_reward_model(
        "np_btl_synthetic", config.model, pools, data_identity=two_user_identity(config.num_pairs, config.data_seed),
        train=config.synthetic_train, episodes=config.episodes, user_names=TWO_USER_NAMES)
    return _Task(fit.model(), config.episodes.max_context, _answered_by_types(pools["test"], config)), entry


def _steering(config: ConsistencyConfig, run: ExperimentRun) -> _Task:
    steering = trained_run(config.steering_run, run.out, run.progress, run.echo)
    pairs = stored_pairs(steering.directory)
    test = OptionPairPool(pairs.pools("all")["test"], pairs.options)
    return _Task(steering.policy, steering.episodes.max_context, _answered_by_types(test, config))


def _answered_by_types(test: PairPool | OptionPairPool, config: ConsistencyConfig) -> AnsweredPairs:
    """Every test pair as each of the two user types answers it (the coins: for any pair a type ties)."""
    return answer_pairs(test, jax.numpy.eye(2), jax.random.key(config.seed))


def run_consistency(config: ConsistencyConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
                    echo=print) -> dict[str, Any]:
    with experiment_run("consistency", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        results, models = {}, {}
        for name in config.tasks:
            if name == "synthetic":
                task, models["np_btl_synthetic"] = _synthetic(config, run)
            else:
                task = _steering(config, run)
            users = config.num_users if name == "synthetic" else config.steering_users
            results[name] = {}
            for which in config.candidate_sets:
                echo(f"{name}, {which} candidates:")
                results[name][which] = _study(task.subset(which), config, users, np.random.default_rng(config.seed),
                                              echo if progress else lambda *_: None)
        return run.finish(tables=[format_table(results)], plots=[], tasks=results, models=models,
                          user_types=TWO_USER_NAMES)


def format_table(results: dict[str, Any]) -> str:
    header = (f"{'task':<11}{'candidates':<13}{'users':>6}{'stable flagged':>16}{'switch: last look':>19}"
              f"{'any look':>10}{'placed ±2':>11}{'flips found':>13}")
    lines = [header, "-" * len(header)]
    for name, by_set in results.items():
        for which, study in by_set.items():
            placed = study["drift_placed_within_2_answers"]
            cells = [study["stable_flagged"], study["switching_flagged_at_last_look"],
                     study["switching_flagged_at_any_look"]]
            lines.append(f"{name:<11}{which:<13}{study['num_users']:>6}"
                         + "".join(f"{100 * c['mean']:>{w}.1f} %" for c, w in zip(cells, (14, 17, 8)))
                         + (f"{100 * placed['mean']:>9.1f} %" if placed else f"{'—':>11}")
                         + f"{100 * study['flipped_are_least_plausible']['mean']:>11.1f} %")
    return "\n".join(lines)
