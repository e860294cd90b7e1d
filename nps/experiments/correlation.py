"""`nps reproduce correlation`: identifiability vs correlation (Example 4.3, Fig. 4).

Options y = [h0, h1] ~ N(0, [[1, ρ], [ρ, 1]]); user type z* = k has reward h_k.
NP-BTL is trained at each ρ_tr and then asked to infer z* from a single context
pair drawn at a test ρ. The Bayes-optimal error is 1/4 + arcsin(ρ)/(2π).

How z* is read off the model: condition on the one context pair, score
``num_probe_pairs`` *conflicting* probe pairs (drawn at the test ρ, so the two user
types disagree on every one), and let ẑ be the user type whose choices the
conditioned model reproduces on more of them; an exact tie is broken by a fair
coin, as in the paper's Bayes rule. The error is P(ẑ ≠ z*) over test tasks.

A softer companion, ``conflicting_pair_error``: the conditioned model's error rate
on those same conflicting probe pairs, judged by the task's true user. Its
Bayes-optimal value is the same 1/4 + arcsin(ρ)/(2π) (a pair that both users
agree on leaves the posterior at the prior, and the prior gets half of the
conflicting pairs right), but unlike the majority vote it does not amplify a
weakly conditioned model into a confident ẑ.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nps.config import check_positive
from nps.data.episodes import EpisodeSpec
from nps.data.pairs import check_splittable
from nps.data.synthetic import (
    TWO_USER_NAMES,
    bayes_error_single_pair,
    conflicting_probe_pairs,
    correlated_identity,
    correlated_pools,
)
from nps.errors import invalid
from nps.models.reward import SYNTHETIC_NP_BTL, RewardModelConfig
from nps.results import (
    experiment_run,
    format_accuracy_table,
    plot_accuracy_vs_context,
    save_figure,
)
from nps.train.evaluate import check_unseen_targets, identification_errors, mean_and_sem
from nps.train.logging import LogConfig
from nps.train.loop import TrainConfig
from nps.train.evaluate import EvalConfig

USER_NAMES = TWO_USER_NAMES

PAPER_RHOS = (-1.0, -0.7, 0.0, 0.7)


@dataclasses.dataclass(frozen=True)
class CorrelationConfig:
    """Defaults: App. C.3.1 (20k pairs per ρ, N^C 0–10, N^T 20; the model of C.1 with 2-D options).
    The paper gives no training budget for this study."""

    seed: int = 0
    num_pairs: int = 20_000
    train_rhos: tuple[float, ...] = PAPER_RHOS
    test_rhos: tuple[float, ...] = PAPER_RHOS
    num_probe_pairs: int = 32
    z_error_tasks: int = 10_000
    episodes: EpisodeSpec = EpisodeSpec()
    # 2,000 steps: at 1,000 the ρ_tr = −1 model is still 2.8 points above the Bayes error at ρ = −1.
    train: TrainConfig = TrainConfig(steps=2000, checkpoint_every=200)
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()  # training curves, evaluation, plots, traces: --set log.backend=...
    model: RewardModelConfig = SYNTHETIC_NP_BTL

    def __post_init__(self):
        if not self.train_rhos or any(not -1.0 <= r <= 1.0 for r in self.train_rhos):
            raise invalid("train_rhos", self.train_rhos, "must be correlations in [-1, 1]")
        if not self.test_rhos or any(not -1.0 <= r < 1.0 for r in self.test_rhos):
            raise invalid("test_rhos", self.test_rhos,
                          "must be in [-1, 1): at ρ = 1 no pair is conflicting, so no probe exists")
        check_positive(self, "num_probe_pairs")
        if self.z_error_tasks < 2:
            raise invalid("z_error_tasks", self.z_error_tasks, "must be at least 2 (for a standard error)")
        if self.model.kind != "np":
            raise invalid("model.kind", self.model.kind, "must be 'np': this study needs an NP-BTL model")
        check_splittable(self.num_pairs)
        check_unseen_targets(self.eval.context_sizes, self.episodes)


def z_inference_errors(fit_result, rho: float, config: CorrelationConfig, seed: int) -> dict[str, Any]:
    """{"z_inference_error": ..., "conflicting_pair_error": ...} at test correlation ρ, next to the Bayes error."""
    probe_a, probe_b = conflicting_probe_pairs(rho, 4096, seed + 1)
    z_errors, pair_errors = identification_errors(
        fit_result.model(), correlated_pools(rho, config.num_pairs, seed)["test"], probe_a, probe_b, config.episodes,
        config.z_error_tasks, config.num_probe_pairs, jax.random.key(seed))
    bayes = {"bayes_optimal": bayes_error_single_pair(rho)}
    return {
        "z_inference_error": mean_and_sem(z_errors) | bayes,
        "conflicting_pair_error": mean_and_sem(pair_errors) | bayes,
    }


def format_error_table(models: dict[str, Any], test_rhos, metric: str) -> str:
    header = f"{metric + ' [%]':<26}" + "".join(f"{'ρ=' + format(r, '+.1f'):>14}" for r in test_rhos)
    bayes = f"{'Bayes-optimal':<26}" + "".join(f"{100 * bayes_error_single_pair(r):>14.1f}" for r in test_rhos)
    rows = [header, "-" * len(header), bayes]
    for name, model in models.items():
        cells = "".join(
            f"{100 * model[metric][str(r)]['mean']:>8.1f} ± {100 * model[metric][str(r)]['sem']:<3.1f}"
            for r in test_rhos
        )
        rows.append(f"{name:<26}{cells}")
    return "\n".join(rows)


ERROR_METRICS = {"z_inference_error": "error of inferring z* [%]",
                 "conflicting_pair_error": "error on conflicting pairs [%]"}


def plot_z_error(models: dict[str, Any], test_rhos, path: Path) -> Path:
    """Fig. 4: both error measures vs the test correlation, one line per training ρ."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    grid = np.linspace(-1, 1, 201)
    for ax, (metric, label) in zip(axes, ERROR_METRICS.items()):
        ax.plot(grid, [100 * bayes_error_single_pair(r) for r in grid], "k--", label="Bayes-optimal")
        for model in models.values():
            errors = [model[metric][str(r)] for r in test_rhos]
            ax.errorbar(test_rhos, [100 * e["mean"] for e in errors], yerr=[100 * e["sem"] for e in errors],
                        marker="o", capsize=3, label=f"trained at ρ={model['train_rho']:+.1f}")
        ax.set_xlabel("test-time correlation ρ of the context pair")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def run_correlation(
    config: CorrelationConfig, out: str | Path, *, fresh: bool = False, progress: bool = True, echo=print
) -> dict[str, Any]:
    with experiment_run("correlation", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        out = run.out
        models = {}
        for rho in config.train_rhos:
            name = f"np_btl_rho{rho:+.1f}"
            fit_result, entry = run.fit_and_evaluate_reward_model(
                name, config.model, correlated_pools(rho, config.num_pairs, config.seed),
                data_identity=correlated_identity(rho, config.num_pairs, config.seed), train=config.train,
                episodes=config.episodes, user_names=USER_NAMES)
            entry["train_rho"] = rho
            errors = {
                str(r): z_inference_errors(fit_result, r, config, config.seed + 1000 + 10 * j)
                for j, r in enumerate(config.test_rhos)
            }
            for metric in ERROR_METRICS:
                entry[metric] = {r: by_metric[metric] for r, by_metric in errors.items()}
            models[name] = entry
        plots = [
            plot_z_error(models, config.test_rhos, out / "z_error_vs_rho.png"),
            plot_accuracy_vs_context(models, USER_NAMES, out / "accuracy_vs_context.png",
                                     "correlated options (each model on its own ρ_tr)"),
        ]
        tables = [format_accuracy_table(models, USER_NAMES)]
        tables += [format_error_table(models, config.test_rhos, metric) for metric in ERROR_METRICS]
        return run.finish(tables=tables, plots=plots, user_types=USER_NAMES, models=models)
