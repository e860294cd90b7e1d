"""The paper's UltraFeedback reward-model experiments (§6.2, §6.4 Fig. 5, §6.5, §6.6).

    nps reproduce hh        --data ULTRAFEEDBACK_FILE_OR_PREPARED --model EMBEDDER_DIR   # Fig. 2a, 3
    nps reproduce hht       --data ... --model ...                                       # Fig. 6, 7
    nps reproduce conflict  --data ... --model ...                                       # Fig. 5
    nps reproduce continuum --data ... --model ... [--set recipe=hht]                    # Fig. 8a (8b)

Option features are the frozen embedder's last-token states of "Human: {prompt}\\n\\nAssistant:
{response}" (the paper: Meta-Llama-3-8B), cached beside the prepared dataset. Defaults are the
released configs: NP-BTL with a linear inner map, 8-head self-attention, sum pooling and a
deterministic z of 256; 64 tasks of N^T = 20 with N^C ~ U{0..10}; Adam at lr 1e-4; 450 updates
on HH (one epoch, the paper's count) and 860 on HHT (two epochs, the HHT config); the best
validation loss is kept. BTL-mixed is trained on every user type's labels, one BTL oracle on
each attribute's alone; all are scored on unseen test targets for every user type.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nps.config import check_models
from nps.data.episodes import (
    EpisodeSpec,
    sample_episodes,
    sample_with_separate_contexts,
)
from nps.data.pairs import OptionPairPool, oracle_pools
from nps.data.prepared import (
    RECIPES,
    SPLITS,
    BuildParameters,
    EmbeddedPreferences,
    PreferenceData,
    embedded_preferences,
)
from nps.data.ultrafeedback import (
    conflict_test_pools,
    option_pair_pool,
    with_conflict_rate,
)
from nps.errors import ConfigError, invalid
from nps.models.reward import UF_NP_BTL, RewardModelConfig
from nps.results import (
    experiment_run,
    format_accuracy_table,
    plot_accuracy_vs_context,
    save_figure,
)
from nps.train.evaluate import (
    check_unseen_targets,
    evaluate_unseen_accuracy,
    weight_cells,
)
from nps.train.logging import LogConfig
from nps.train.loop import TrainConfig
from nps.train.evaluate import EvalConfig

MODEL_NAMES = ("btl_mixed", "btl_oracles", "np_btl", "np_btl_variational")
# The released UF configs are deterministic; the variational variant's KL weight and sample counts are
# unspecified (paper.md §2.4). One z sample per training task (the usual NP ELBO estimator) runs 1.8×
# faster than four here, and 450 steps already average over 28,800 tasks.
UF_NP_BTL_VARIATIONAL = dataclasses.replace(
    UF_NP_BTL, encoder=dataclasses.replace(UF_NP_BTL.encoder, stochastic=True), kl_weight=1.0, train_latent_samples=1
)


@dataclasses.dataclass(frozen=True)
class UFInputs:
    """What every UltraFeedback reward experiment reads: the data, its split, and the embedder."""

    data: str = ""  # UltraFeedback's train split (JSON lines or parquet) or a folder from `nps prepare`
    model: str = ""  # the frozen embedder: a local Llama/Qwen/Gemma directory (paper: Meta-Llama-3-8B)
    split_by: str = "pair"
    seed: int = 42  # the data split's seed (the released split_uf_data.py)
    dtype: str = "bfloat16"  # the embedder's weights (the paper: fp16)
    embed_max_length: int = 1024
    embed_batch_size: int = 16
    episodes: EpisodeSpec = EpisodeSpec()
    train: TrainConfig = TrainConfig(steps=450, seed=2)
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()  # training curves, evaluation, plots, traces: --set log.backend=...

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise invalid("dtype", self.dtype, "must be 'bfloat16' or 'float32'")
        self.build().validate()
        check_unseen_targets(self.eval.context_sizes, self.episodes)

    def build(self) -> BuildParameters:
        """The prepared dataset this experiment reads (recipe, conflict rate, split)."""
        raise NotImplementedError

    def require_inputs(self) -> None:
        if not self.data or not self.model:
            raise ConfigError("this experiment needs --data (UltraFeedback's train file or a prepared dataset) and "
                              "--model (the embedder's directory, e.g. Meta-Llama-3-8B)")


@dataclasses.dataclass(frozen=True)
class UFRewardConfig(UFInputs):
    """`nps reproduce hh` / `hht`: BTL-mixed, BTL oracles and NP-BTL on one recipe."""

    recipe: str = "hh"
    conflict_rate: float = 1.0
    # The paper's models; add np_btl_variational (nps's extension) with --set models=...
    models: tuple[str, ...] = ("btl_mixed", "btl_oracles", "np_btl")
    btl: RewardModelConfig = RewardModelConfig(kind="btl")
    np_btl: RewardModelConfig = UF_NP_BTL
    np_btl_variational: RewardModelConfig = UF_NP_BTL_VARIATIONAL
    pca_context_sizes: tuple[int, ...] = (1, 10)  # Fig. 3 / 7: z of test users at these N^C

    def build(self) -> BuildParameters:
        return BuildParameters(self.recipe, self.conflict_rate, self.split_by, self.seed)

    def __post_init__(self):
        super().__post_init__()
        check_models(self.models, MODEL_NAMES)
        if max(self.pca_context_sizes, default=0) > self.episodes.num_targets:
            raise invalid("pca_context_sizes", self.pca_context_sizes,
                          f"exceeds episodes.num_targets={self.episodes.num_targets}")


def hht_defaults() -> UFRewardConfig:
    """The released HHT config: seed 1, two epochs of 27,475 / 64 tasks."""
    return UFRewardConfig(recipe="hht", train=TrainConfig(steps=860, seed=1))


@dataclasses.dataclass(frozen=True)
class ConflictConfig(UFInputs):
    """`nps reproduce conflict` (Fig. 5): NP-BTL trained at several conflict rates, tested with
    contexts at several conflict rates and conflicting targets.

    One HH dataset at conflict rate 0.5 holds every conflicting pair and as many agreeing ones.
    Each training rate r takes int(n·r) conflicting and int(n·(1 − r)) agreeing pairs of its train
    and val splits (n = their conflicting pairs: every rate has the same size, as App. C.3.2).
    Every model is tested on the same test split: targets from one half of its conflicting pairs,
    contexts at rate c from the other half and the agreeing pairs, so no target is in a context.
    """

    train_rates: tuple[float, ...] = (1.0, 0.75, 0.5)
    context_rates: tuple[float, ...] = (0.5, 0.75, 1.0)
    np_btl: RewardModelConfig = UF_NP_BTL

    def build(self) -> BuildParameters:
        return BuildParameters("hh", 0.5, self.split_by, self.seed)

    def __post_init__(self):
        super().__post_init__()
        for name in ("train_rates", "context_rates"):
            rates = getattr(self, name)
            if not rates or not all(0.0 < r <= 1.0 for r in rates):
                raise invalid(name, rates, "must be rates in (0, 1]")


@dataclasses.dataclass(frozen=True)
class ContinuumConfig(UFInputs):
    """`nps reproduce continuum` (Fig. 8): users with weights w ~ Dirichlet(0.5) over the recipe's
    attributes (HH: 2-D, HHT: 3-D) and utility w · ratings; NP-BTL and BTL-mixed; accuracy per
    bin of w (2-D: ten bins of w₀; 3-D: a grid of cells over (w₀, w₁))."""

    recipe: str = "hh"
    models: tuple[str, ...] = ("btl_mixed", "np_btl")
    episodes: EpisodeSpec = EpisodeSpec(user_prior="dirichlet", dirichlet_concentration=0.5)
    eval: EvalConfig = EvalConfig(num_tasks=5000)
    btl: RewardModelConfig = RewardModelConfig(kind="btl")
    np_btl: RewardModelConfig = UF_NP_BTL
    bins: int = 10  # per axis

    def build(self) -> BuildParameters:
        return BuildParameters(self.recipe, 1.0, self.split_by, self.seed)

    def __post_init__(self):
        super().__post_init__()
        check_models(self.models, ("btl_mixed", "np_btl"))
        if self.episodes.user_prior != "dirichlet":
            raise invalid("episodes.user_prior", self.episodes.user_prior, "must be 'dirichlet' for the continuum")
        if self.bins < 2:
            raise invalid("bins", self.bins, "must be at least 2")
        if len(RECIPES[self.recipe]) > 3:  # the cells bin (w₀, w₁): further weights would vary inside a cell
            raise invalid("recipe", self.recipe, "has more than three attributes; the continuum bins two or three "
                          "(use hh or hht)")


# -- data --------------------------------------------------------------------------------------------
def prepare_inputs(config: UFInputs, out: Path, echo) -> EmbeddedPreferences:
    """Prepare the data (from the raw file if needed) and embed its options (cached)."""
    config.require_inputs()
    inputs = embedded_preferences(config.data, config.model, out, config.build(),
                                  {split: config.episodes.num_targets for split in SPLITS}, dtype=config.dtype,
                                  max_length=config.embed_max_length, batch_size=config.embed_batch_size, echo=echo)
    if inputs.embedder["options_per_second"]:
        echo(f"embedded {inputs.embedder['embedded_now']} options at {inputs.embedder['options_per_second']:.1f} "
             "options/s")
    return inputs._replace(features=jnp.asarray(inputs.features))


def uf_pools(data: PreferenceData, features: jax.Array) -> dict[str, OptionPairPool]:
    """The pools of a prepared dataset's splits, options by their features ``[M, D]``."""
    return {split: option_pair_pool(pairs, data.options.ratings, features) for split, pairs in data.splits.items()}


# -- hh / hht ----------------------------------------------------------------------------------------
def run_uf_rewards(config: UFRewardConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
                   echo=print) -> dict[str, Any]:
    """BTL-mixed, a BTL oracle per attribute and NP-BTL on HH or HHT; Fig. 2a / 6 and the PCA of z."""
    with experiment_run(config.recipe, config, out, fresh=fresh, progress=progress, echo=echo) as run:
        out = run.out
        data, features, embedder, identity = prepare_inputs(config, out, echo)
        users = list(data.attributes)
        pools = uf_pools(data, features)
        jobs = []  # (name, model config, training pools, whose labels it trains on)
        for name in config.models:
            if name == "btl_oracles":
                jobs += [(f"btl_{user}", config.btl, oracle_pools(pools, k), user) for k, user in enumerate(users)]
            else:
                jobs.append((name, config.btl if name == "btl_mixed" else getattr(config, name), pools, "all"))
        models, fits = {}, {}
        for name, model_config, job_pools, labels in jobs:
            fits[name], models[name] = run.fit_and_evaluate_reward_model(
                name, model_config, job_pools, data_identity=identity | {"labels": labels}, train=config.train,
                episodes=config.episodes, user_names=users)
        title = f"UltraFeedback {config.recipe.upper()}: reward-model accuracy on unseen pairs"
        plots = [plot_accuracy_vs_context(models, users, out / "accuracy_vs_context.png", title)]
        for name in ("np_btl", "np_btl_variational"):
            if name in fits:
                plots.append(plot_latent_pca(fits[name].model(), pools["test"], config.episodes, users,
                                             config.pca_context_sizes, out / f"{name}_z_pca.png", name))
        return run.finish(tables=[format_accuracy_table(models, users)], plots=plots, data=identity,
                          embedder=embedder, user_types=users, models=models)


def latent_pca(z: np.ndarray, components: int = 2) -> np.ndarray:
    """Projections [N, components] of z [N, d] on its leading principal components."""
    centred = z - z.mean(axis=0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    return centred @ directions[:components].T


def plot_latent_pca(model, pool, spec: EpisodeSpec, users: list[str], context_sizes, path: Path, title: str,
                    num_tasks: int = 500) -> Path:
    """Fig. 3 / 7: test users' z (the mean of q(z|C) when variational) on two principal components,
    coloured by user type, one panel per N^C (the same users and targets in every panel)."""
    import matplotlib.pyplot as plt

    spec = spec.for_context(max(context_sizes))
    fig, axes = plt.subplots(1, len(context_sizes), figsize=(4 * len(context_sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], context_sizes):
        episodes = sample_episodes(jax.random.key(11), pool, spec, num_tasks, size)
        projected = latent_pca(np.asarray(model.context_latent(episodes)))
        user = np.asarray(episodes.user)
        for k, name in enumerate(users):
            ax.scatter(*projected[user == k].T, s=6, alpha=0.6, label=name)
        ax.set_title(f"$N^C$ = {size}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[0][-1].legend(fontsize=8, markerscale=2)
    fig.suptitle(f"{title}: z of test users")
    return save_figure(fig, path)


# -- conflict-rate study -----------------------------------------------------------------------------
def run_conflict(config: ConflictConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
                 echo=print) -> dict[str, Any]:
    with experiment_run("conflict", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        out = run.out
        data, features, embedder, identity = prepare_inputs(config, out, echo)
        users = list(data.attributes)
        ratings = data.options.ratings
        test = data.splits["test"]
        context_pools = {rate: conflict_test_pools(test, ratings, features, rate, config.seed)
                         for rate in config.context_rates}
        models = {}
        for rate in config.train_rates:
            name = f"np_btl_conflict{rate:g}"
            pools = {split: option_pair_pool(with_conflict_rate(data.splits[split], rate, config.seed), ratings,
                                             features)
                     for split in ("train", "val")}
            pools["test"] = context_pools[max(config.context_rates)][0]
            fit, entry = run.fit_and_evaluate_reward_model(
                name, config.np_btl, pools, data_identity=identity | {"train_conflict_rate": rate},
                train=config.train, episodes=config.episodes, user_names=users)
            entry["train_conflict_rate"] = rate
            entry["by_context_conflict_rate"] = {
                f"{c:g}": evaluate_unseen_accuracy(
                    fit.model(), context_pools[c], config.episodes, users, config.eval.context_sizes,
                    config.eval.num_tasks, config.eval.seed, sample=sample_with_separate_contexts)
                for c in config.context_rates
            }
            models[name] = entry
        plots = [plot_conflict_study(models, config.context_rates, out / "conflict_rate_study.png")]
        return run.finish(tables=[format_conflict_table(models, config.context_rates)], plots=plots, data=identity,
                          embedder=embedder, user_types=users, models=models)


def format_conflict_table(models: dict[str, Any], context_rates) -> str:
    """Rows: model × test context conflict rate; columns: accuracy [%] over all users per N^C."""
    sizes = list(next(iter(models.values()))["by_context_conflict_rate"][f"{context_rates[0]:g}"])
    header = f"{'model':<24}{'context rate':>13}" + "".join(f"{'N^C=' + s:>15}" for s in sizes)
    lines = [header, "-" * len(header)]
    for name, model in models.items():
        for rate, by_size in model["by_context_conflict_rate"].items():
            cells = "".join(f"{100 * by_size[s]['all']['mean']:>9.1f} ± {100 * by_size[s]['all']['sem']:<3.1f}"
                            for s in sizes)
            lines.append(f"{name:<24}{rate:>13}{cells}")
    return "\n".join(lines)


def plot_conflict_study(models: dict[str, Any], context_rates, path: Path) -> Path:
    """Fig. 5: accuracy vs N^C, one panel per test context conflict rate, one line per training rate."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(context_rates), figsize=(4.2 * len(context_rates), 3.4), sharey=True,
                             squeeze=False)
    for ax, rate in zip(axes[0], context_rates):
        for model in models.values():
            by_size = model["by_context_conflict_rate"][f"{rate:g}"]
            sizes = [int(s) for s in by_size]
            ax.errorbar(sizes, [100 * v["all"]["mean"] for v in by_size.values()],
                        yerr=[100 * v["all"]["sem"] for v in by_size.values()], marker="o", capsize=3,
                        label=f"trained at {model['train_conflict_rate']:g}")
        ax.set_title(f"test context conflict rate {rate:g}")
        ax.set_xlabel("context pairs $N^C$")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on conflicting pairs [%]")
    axes[0][-1].legend(fontsize=8)
    return save_figure(fig, path)


# -- continuum ---------------------------------------------------------------------------------------
def run_continuum(config: ContinuumConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
                  echo=print) -> dict[str, Any]:
    with experiment_run("continuum", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        out = run.out
        data, features, embedder, identity = prepare_inputs(config, out, echo)
        pools = uf_pools(data, features)
        attributes = list(data.attributes)
        identity |= {"users": "dirichlet", "dirichlet_concentration": config.episodes.dirichlet_concentration}
        group_by, centres = weight_cells(len(attributes), config.bins)
        models = {}
        for name in config.models:
            fit, entry = run.fit_and_evaluate_reward_model(
                name, config.btl if name == "btl_mixed" else config.np_btl, pools, data_identity=identity,
                train=config.train, episodes=config.episodes, user_names=attributes)
            entry["unseen_accuracy_by_weight"] = evaluate_unseen_accuracy(
                fit.model(), pools["test"], config.episodes, attributes, config.eval.context_sizes,
                config.eval.num_tasks, config.eval.seed, group_by=group_by)
            models[name] = entry
        plots = [plot_continuum(models, centres, config.bins, out / "accuracy_by_weight.png")]
        return run.finish(tables=[format_accuracy_table(models, attributes)], plots=plots, data=identity,
                          embedder=embedder, user_types=attributes, models=models)


def plot_continuum(models: dict[str, Any], centres: dict[str, tuple[float, ...]], bins: int, path: Path) -> Path:
    """Fig. 8a (2-D): accuracy per bin of w₀, one line per N^C. Fig. 8b (3-D): accuracy per cell
    of (w₀, w₁) at the largest N^C."""
    import matplotlib.pyplot as plt

    two_d = len(next(iter(centres.values()))) == 1
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        by_size = model["unseen_accuracy_by_weight"]
        for size, groups in by_size.items():
            cells = {k: v for k, v in groups.items() if k != "all"}
            if two_d:
                ax.errorbar([centres[k][0] for k in cells], [100 * v["mean"] for v in cells.values()],
                            yerr=[100 * v["sem"] for v in cells.values()], marker="o", capsize=2,
                            label=f"$N^C$ = {size}")
            elif size == list(by_size)[-1]:
                shown = ax.scatter([centres[k][0] for k in cells], [centres[k][1] for k in cells],
                                   c=[100 * v["mean"] for v in cells.values()], s=2500 / bins, marker="s",
                                   cmap="viridis")
                fig.colorbar(shown, ax=ax, label=f"accuracy [%] at $N^C$ = {size}")
        if two_d:
            ax.axhline(50, color="grey", linestyle="--")
            ax.set_xlabel("user's weight on the first attribute $w_0$")
            ax.set_ylabel("accuracy on unseen pairs [%]")
            ax.legend(fontsize=7)
        else:
            ax.set_xlabel("$w_0$")
            ax.set_ylabel("$w_1$")
        ax.set_title(name)
    return save_figure(fig, path)
