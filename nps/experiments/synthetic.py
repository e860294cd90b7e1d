"""`nps reproduce synthetic`: the paper's two-user task (§5.1, Fig. 1) with BTL, DPL and NP-BTL."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nps.config import check_models
from nps.data.episodes import EpisodeSpec
from nps.data.pairs import check_splittable
from nps.data.synthetic import (
    TWO_USER_NAMES,
    two_user_identity,
    two_user_pools,
    two_user_reward,
)
from nps.models.reward import SYNTHETIC_NP_BTL, RewardModelConfig
from nps.results import (
    experiment_run,
    format_accuracy_table,
    plot_accuracy_vs_context,
    save_figure,
)
from nps.train.evaluate import check_unseen_targets, rewards_given_context
from nps.train.logging import LogConfig
from nps.train.loop import TrainConfig
from nps.train.evaluate import EvalConfig

USER_NAMES = TWO_USER_NAMES
MODEL_NAMES = ("btl", "dpl", "np_btl", "np_btl_variational")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Defaults: the paper / released code (20k pairs, 80/10/10, N^C 0–10, N^T 20, 64 tasks, lr 1e-4,
    1,000 iterations per model as the released code runs)."""

    seed: int = 0
    num_pairs: int = 20_000
    threshold: float = 0.5
    models: tuple[str, ...] = ("btl", "dpl", "np_btl")
    episodes: EpisodeSpec = EpisodeSpec()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()  # training curves, evaluation, plots, traces: --set log.backend=...
    btl: RewardModelConfig = RewardModelConfig(kind="btl")
    dpl: RewardModelConfig = RewardModelConfig(kind="dpl")
    np_btl: RewardModelConfig = SYNTHETIC_NP_BTL
    np_btl_variational: RewardModelConfig = dataclasses.replace(
        SYNTHETIC_NP_BTL,
        encoder=dataclasses.replace(SYNTHETIC_NP_BTL.encoder, stochastic=True),
        kl_weight=1.0,
        train_latent_samples=4,
    )

    def __post_init__(self):
        check_splittable(self.num_pairs)
        check_models(self.models, MODEL_NAMES)
        check_unseen_targets(self.eval.context_sizes, self.episodes)


def _reward_curves(fits: dict[str, Any], pools, spec: EpisodeSpec, grid: np.ndarray) -> dict[str, Any]:
    """Each model's reward over ``grid``; NP-BTL conditioned on 10 context pairs per user type."""
    options = jnp.asarray(grid[:, None], jnp.float32)
    curves: dict[str, Any] = {}
    for name, result in fits.items():
        if name == "btl":
            curves[name] = {"all": np.asarray(result.model().reward(options))}
        elif name == "dpl":
            mean, std = result.model().reward_distribution(options)
            curves[name] = {"all": np.asarray(mean), "all_std": np.asarray(std)}
        else:
            rewards, user = rewards_given_context(result.model(), pools["test"], spec, options, 64, jax.random.key(7))
            curves[name] = {USER_NAMES[u]: rewards[np.argmax(user == u)] for u in range(2)}
    return curves


def _standardise(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / (values.std() + 1e-12)


def plot_reward_curves(curves: dict[str, Any], grid: np.ndarray, threshold: float, path: Path) -> Path:
    """Fig. 1a: true rewards of both users next to each model's (standardised) reward."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves) + 1, figsize=(3.6 * (len(curves) + 1), 3.2), sharey=True)
    colours = {USER_NAMES[0]: "tab:blue", USER_NAMES[1]: "tab:orange"}
    for user, name in enumerate(USER_NAMES):
        axes[0].plot(grid, _standardise(two_user_reward(grid, user, threshold)), color=colours[name], label=name)
    axes[0].set_title("ground truth")
    for ax, (model, by_user) in zip(axes[1:], curves.items()):
        if "all" in by_user:
            mean = by_user["all"]
            scale = mean.std() + 1e-12
            ax.plot(grid, _standardise(mean), color="black", label="shared reward")
            if "all_std" in by_user:
                centred = mean - mean.mean()
                low, high = (centred - by_user["all_std"]) / scale, (centred + by_user["all_std"]) / scale
                ax.fill_between(grid, low, high, color="grey", alpha=0.3, label="± σ(y)")
        else:
            for name, values in by_user.items():
                ax.plot(grid, _standardise(values), color=colours[name], label=f"{name}, 10 context pairs")
        ax.set_title(model)
    for ax in axes:
        ax.set_xlabel("option y")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("standardised reward")
    return save_figure(fig, path)


def run_synthetic(
    config: SyntheticConfig, out: str | Path, *, fresh: bool = False, progress: bool = True, echo=print
) -> dict[str, Any]:
    """Train and evaluate ``config.models``; write results.json and plots under ``out``."""
    with experiment_run("synthetic", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        out = run.out
        pools = two_user_pools(config.num_pairs, config.seed, config.threshold)
        data_identity = two_user_identity(config.num_pairs, config.seed, config.threshold)
        models, fits = {}, {}
        for name in config.models:
            fits[name], models[name] = run.fit_and_evaluate_reward_model(
                name, getattr(config, name), pools, data_identity=data_identity, train=config.train,
                episodes=config.episodes, user_names=USER_NAMES)
        grid = np.linspace(0.0, 1.0, 201)
        plots = [
            plot_accuracy_vs_context(models, USER_NAMES, out / "accuracy_vs_context.png", "synthetic two-user task"),
            plot_reward_curves(_reward_curves(fits, pools, config.episodes, grid), grid, config.threshold,
                               out / "reward_curves.png"),
        ]
        return run.finish(
            tables=[format_accuracy_table(models, USER_NAMES)], plots=plots,
            data=data_identity | {"split_sizes": {k: p.num_pairs for k, p in pools.items()}},
            user_types=USER_NAMES, models=models,
        )
