"""Train one reward model with checkpoints, then score it on unseen targets."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from nps.config import config_to_dict
from nps.data.episodes import EpisodeSpec, PairPool
from nps.errors import ConfigError
from nps.models.reward import RewardModelConfig, build_reward_model
from nps.train.evaluate import PAPER_CONTEXT_SIZES, evaluate_unseen_accuracy
from nps.train.loop import FitResult, TrainConfig, fit


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Test-time tasks: N^T as in training, N^C from ``context_sizes`` (the paper's by default)."""

    context_sizes: tuple[int, ...] = PAPER_CONTEXT_SIZES
    num_tasks: int = 2000
    seed: int = 1

    def validate(self, prefix: str = "eval") -> None:
        if not self.context_sizes or min(self.context_sizes) < 0:
            raise ConfigError(f"{prefix}.context_sizes={self.context_sizes} must be non-negative sizes")
        if self.num_tasks < 2:
            raise ConfigError(f"{prefix}.num_tasks={self.num_tasks} must be at least 2 (for a standard error)")


def train_and_evaluate(
    name: str,
    model_config: RewardModelConfig,
    option_dim: int,
    pools: dict[str, PairPool],
    spec: EpisodeSpec,
    train: TrainConfig,
    evaluation: EvalConfig,
    out: Path,
    user_names: Sequence[str],
    *,
    data_identity: dict[str, Any],
    progress: bool = True,
) -> tuple[FitResult, dict[str, Any]]:
    """Build the reward model of ``model_config``, then ``fit_and_evaluate`` it."""
    return fit_and_evaluate(
        name,
        build_reward_model(option_dim, model_config, seed=train.seed),
        model_config.kind,
        {"model": config_to_dict(model_config), "data": data_identity},
        pools,
        spec,
        train,
        evaluation,
        out,
        user_names,
        progress=progress,
    )


def fit_and_evaluate(
    name: str,
    model,
    kind: str,
    run_config: dict[str, Any],
    pools: dict[str, Any],
    spec: EpisodeSpec,
    train: TrainConfig,
    evaluation: EvalConfig,
    out: Path,
    user_names: Sequence[str],
    *,
    progress: bool = True,
    eval_spec: EpisodeSpec | None = None,
    mesh=None,
) -> tuple[FitResult, dict[str, Any]]:
    """Fit any ``fit``-able model (resuming from ``out/checkpoints/<name>``) and evaluate it.

    ``run_config`` identifies the run (model, data, base LM); a checkpoint made under
    another one is refused. ``eval_spec``: test tasks' shape when it differs from
    training's (e.g. N^T = 13 at test for DPO trained with N^T = 9). Returns the fit
    and the model's results entry.
    """
    eval_spec = eval_spec or spec
    if max(evaluation.context_sizes) > eval_spec.num_targets:
        raise ConfigError(
            f"eval.context_sizes has N^C={max(evaluation.context_sizes)} > the test tasks' "
            f"num_targets={eval_spec.num_targets}; the context is a subset of the targets"
        )
    start = time.perf_counter()
    result = fit(
        model,
        pools["train"],
        pools["val"],
        spec,
        train,
        out / "checkpoints" / name,
        run_config=run_config,
        progress=progress,
        description=name,
        mesh=mesh,
    )
    accuracy = evaluate_unseen_accuracy(
        result.graphdef,
        result.params,
        pools["test"],
        eval_spec,
        user_names,
        evaluation.context_sizes,
        evaluation.num_tasks,
        evaluation.seed,
        frozen=result.frozen,
    )
    entry = {
        "kind": kind,
        "unseen_accuracy": accuracy,
        "best_step": result.best_step,
        "best_val_nll": result.best_val_loss,
        "train_steps": train.steps,
        "train_steps_per_second": result.steps_per_second,
        "wall_clock_seconds": time.perf_counter() - start,
        "history": result.history,
    }
    return result, entry
