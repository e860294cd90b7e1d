"""Train one model with checkpoints, then score it on unseen targets: one entry of results.json."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from nps.config import config_to_dict
from nps.data.episodes import EpisodeSpec
from nps.errors import invalid
from nps.models.reward import RewardModelConfig, build_reward_model
from nps.train.distributed import WAIT_FOR_PEERS, agree_with_primary
from nps.train.evaluate import (
    PAPER_CONTEXT_SIZES,
    check_unseen_targets,
    evaluate_unseen_accuracy,
)
from nps.train.logging import LogConfig, RunLog
from nps.train.loop import FitResult, TrainConfig, fit


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


def fit_and_evaluate(
    name: str,
    model,
    pools: dict[str, Any],
    *,
    kind: str,
    episodes: EpisodeSpec,
    train: TrainConfig,
    evaluation: EvalConfig,
    out: Path,
    user_names: Sequence[str],
    run_config: dict[str, Any],
    eval_episodes: EpisodeSpec | None = None,
    mesh=None,
    progress: bool = True,
    log: LogConfig = LogConfig(),
) -> tuple[FitResult, dict[str, Any]]:
    """Fit any ``fit``-able model (resuming from ``out/checkpoints/<name>``) and evaluate it.

    ``pools``: "train", "val" and "test" pools; ``kind``: the model's kind, for the results.
    ``run_config`` identifies the run (model, data,
    base LM); a checkpoint made under another one is refused. ``eval_episodes``: the test tasks'
    shape when it differs from training's (e.g. N^T = 13 at test for DPO trained with N^T = 9).
    ``log``: the training curves, the accuracy table and any profile trace go to ``out/logs/<name>``.
    Returns the fit and the model's results entry.
    """
    eval_episodes = eval_episodes or episodes
    check_unseen_targets(evaluation.context_sizes, eval_episodes)
    agree_with_primary(run_config, f"run config of {name}", WAIT_FOR_PEERS)  # each process its part of one model
    start = time.perf_counter()
    with RunLog(log, out / "logs" / name, run_config=run_config) as run_log:
        result = fit(
            model, pools["train"], pools["val"], episodes, train, out / "checkpoints" / name,
            run_config=run_config, progress=progress, description=name, mesh=mesh, hooks=run_log.hooks(),
        )
        accuracy = evaluate_unseen_accuracy(
            result.graphdef, result.params, pools["test"], eval_episodes, user_names, evaluation.context_sizes,
            evaluation.num_tasks, evaluation.seed, frozen=result.frozen,
        )
        run_log.evaluation(result.steps, accuracy)
    entry = {
        "kind": kind,
        "unseen_accuracy": accuracy,
        "best_step": result.best_step,
        "best_val_nll": result.best_val_loss,
        "train_steps": result.steps,
        "train_steps_per_second": result.steps_per_second,
        "wall_clock_seconds": time.perf_counter() - start,
        "history": result.history,
    }
    return result, entry


def train_and_evaluate(
    name: str, config: RewardModelConfig, pools: dict[str, Any], *, data_identity: dict[str, Any], train: TrainConfig,
    **kwargs,
) -> tuple[FitResult, dict[str, Any]]:
    """Build the reward model of ``config`` for the pools' options (seeded by ``train.seed``), then
    ``fit_and_evaluate`` it; ``kwargs`` are ``fit_and_evaluate``'s."""
    model = build_reward_model(pools["train"].option_dim, config, seed=train.seed)
    run_config = {"model": config_to_dict(config), "data": data_identity}
    return fit_and_evaluate(name, model, pools, kind=config.kind, train=train, run_config=run_config, **kwargs)
