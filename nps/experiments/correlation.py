"""`nps reproduce correlation`: identifiability vs correlation (Example 4.3, Fig. 4).

Options y = [h0, h1] ~ N(0, [[1, ρ], [ρ, 1]]); user type z* = k has reward h_k.
NP-BTL is trained at each ρ_tr and then asked to infer z* from a single context
pair drawn at a test ρ. The Bayes-optimal error is 1/4 + arcsin(ρ)/(2π).

How z* is read off the model: condition on the one context pair, score
``num_probe_pairs`` *conflicting* probe pairs (drawn at the test ρ, so the two user
types disagree on every one), and let ẑ be the user type whose choices the
conditioned model reproduces on more of them; an exact tie is broken by a fair
coin, as in the paper's Bayes rule. The error is P(ẑ ≠ z*) over test tasks.
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

from nps.config import config_to_dict
from nps.data.episodes import EpisodeSpec, PairPool, sample_episodes
from nps.data.synthetic import bayes_error_single_pair, correlated_options, correlated_pools
from nps.errors import ConfigError
from nps.experiments.report import (
    format_accuracy_table,
    plot_accuracy_vs_context,
    prepare_output_dir,
    write_results,
)
from nps.experiments.runner import EvalConfig, train_and_evaluate
from nps.likelihood import choice_correct
from nps.models.reward import RewardModelConfig
from nps.train.evaluate import mean_and_sem
from nps.train.loop import TrainConfig

USER_NAMES = ["z=0", "z=1"]
PAPER_RHOS = (-1.0, -0.7, 0.0, 0.7)


@dataclasses.dataclass(frozen=True)
class CorrelationConfig:
    """Defaults: App. C.3.1 (20k pairs per ρ, N^C 0–10, N^T 20; the model of C.1 with 2-D options)."""

    seed: int = 0
    num_pairs: int = 20_000
    train_rhos: tuple[float, ...] = PAPER_RHOS
    test_rhos: tuple[float, ...] = PAPER_RHOS
    num_probe_pairs: int = 32
    z_error_tasks: int = 2000
    episodes: EpisodeSpec = EpisodeSpec()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    model: RewardModelConfig = RewardModelConfig(kind="np")

    def validate(self) -> None:
        for name in ("train_rhos", "test_rhos"):
            rhos = getattr(self, name)
            if not rhos or any(not -1.0 <= r <= 1.0 for r in rhos):
                raise ConfigError(f"{name}={rhos} must be correlations in [-1, 1]")
        if self.num_probe_pairs < 1 or self.z_error_tasks < 2:
            raise ConfigError("num_probe_pairs must be ≥ 1 and z_error_tasks ≥ 2")
        if self.model.kind != "np":
            raise ConfigError(f"model.kind={self.model.kind!r}: this study needs an NP-BTL model ('np')")
        if self.num_pairs < 10:
            raise ConfigError(f"num_pairs={self.num_pairs} is too small to split 80/10/10; use at least 10")
        self.episodes.validate()
        self.train.validate()
        self.eval.validate()
        self.model.validate("model")


def conflicting_probe_pairs(rho: float, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` option pairs at correlation ρ on which the two user types disagree."""
    rng = np.random.default_rng(seed)
    found_a, found_b, have = [], [], 0
    while have < num:
        a, b = correlated_options(rng, 4 * num, rho), correlated_options(rng, 4 * num, rho)
        conflict = (a[:, 0] > b[:, 0]) != (a[:, 1] > b[:, 1])
        found_a.append(a[conflict])
        found_b.append(b[conflict])
        have += int(conflict.sum())
    return np.concatenate(found_a)[:num], np.concatenate(found_b)[:num]


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "num_tasks", "num_probes"))
def _z_inference_errors(graphdef, params, pool, probe_a, probe_b, key, *, spec, num_tasks, num_probes):
    """Per-task 0/1 error of ẑ from one context pair (see the module docstring)."""
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
    log_odds = nnx.merge(graphdef, params).predict_log_odds(probes, key_model)
    user0_prefers_a = jnp.where(a[..., 0] > b[..., 0], 1.0, -1.0)
    agreement_with_user0 = jnp.mean(choice_correct(log_odds * user0_prefers_a), axis=-1)
    coin = jax.random.bernoulli(key_coin, 0.5, (num_tasks,)).astype(jnp.int32)
    z_hat = jnp.where(agreement_with_user0 > 0.5, 0, jnp.where(agreement_with_user0 < 0.5, 1, coin))
    return (z_hat != episodes.user).astype(jnp.float32)


def z_inference_error(fit_result, rho: float, config: CorrelationConfig, seed: int) -> dict[str, Any]:
    pool = correlated_pools(rho, config.num_pairs, seed)["test"]
    probe_a, probe_b = conflicting_probe_pairs(rho, 4096, seed + 1)
    errors = _z_inference_errors(
        fit_result.graphdef, fit_result.params, pool, jnp.asarray(probe_a, jnp.float32),
        jnp.asarray(probe_b, jnp.float32), jax.random.key(seed), spec=config.episodes,
        num_tasks=config.z_error_tasks, num_probes=config.num_probe_pairs,
    )
    return mean_and_sem(np.asarray(errors)) | {"bayes_optimal": bayes_error_single_pair(rho)}


def format_error_table(models: dict[str, Any], test_rhos) -> str:
    header = f"{'z* error [%] from 1 pair':<26}" + "".join(f"{'ρ=' + format(r, '+.1f'):>14}" for r in test_rhos)
    bayes = f"{'Bayes-optimal':<26}" + "".join(f"{100 * bayes_error_single_pair(r):>14.1f}" for r in test_rhos)
    rows = [header, "-" * len(header), bayes]
    for name, model in models.items():
        cells = "".join(
            f"{100 * model['z_inference_error'][str(r)]['mean']:>8.1f} ± {100 * model['z_inference_error'][str(r)]['sem']:<3.1f}"
            for r in test_rhos
        )
        rows.append(f"{name:<26}{cells}")
    return "\n".join(rows)


def plot_z_error(models: dict[str, Any], test_rhos, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    grid = np.linspace(-1, 1, 201)
    ax.plot(grid, [100 * bayes_error_single_pair(r) for r in grid], "k--", label="Bayes-optimal")
    for name, model in models.items():
        errors = [model["z_inference_error"][str(r)] for r in test_rhos]
        ax.errorbar(test_rhos, [100 * e["mean"] for e in errors], yerr=[100 * e["sem"] for e in errors],
                    marker="o", capsize=3, label=f"trained at ρ={model['train_rho']:+.1f}")
    ax.set_xlabel("test-time correlation ρ of the context pair")
    ax.set_ylabel("error of inferring z* [%]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_correlation(
    config: CorrelationConfig, out: str | Path, *, fresh: bool = False, progress: bool = True, echo=print
) -> dict[str, Any]:
    config.validate()
    start = time.perf_counter()
    out = prepare_output_dir(out, fresh)
    models = {}
    for index, rho in enumerate(config.train_rhos):
        name = f"np_btl_rho{rho:+.1f}"
        pools = correlated_pools(rho, config.num_pairs, config.seed)
        data_identity = {"name": "synthetic-correlated", "rho": rho, "num_pairs": config.num_pairs, "seed": config.seed}
        fit_result, entry = train_and_evaluate(
            name, config.model, 2, pools, config.episodes, config.train, config.eval, out, USER_NAMES,
            data_identity=data_identity, progress=progress,
        )
        entry["train_rho"] = rho
        entry["z_inference_error"] = {
            str(r): z_inference_error(fit_result, r, config, config.seed + 1000 + 10 * j)
            for j, r in enumerate(config.test_rhos)
        }
        models[name] = entry
    plots = [
        plot_z_error(models, config.test_rhos, out / "z_error_vs_rho.png"),
        plot_accuracy_vs_context(models, USER_NAMES, out / "accuracy_vs_context.png",
                                 "correlated options (each model on its own ρ_tr)"),
    ]
    results = {
        "experiment": "correlation",
        "config": config_to_dict(config),
        "user_types": USER_NAMES,
        "models": models,
        "plots": [p.name for p in plots],
        "wall_clock_seconds": time.perf_counter() - start,
    }
    path = write_results(out, results)
    echo(format_accuracy_table(models, USER_NAMES))
    echo("\n" + format_error_table(models, config.test_rhos))
    echo(f"\nwrote {path}\nplots: {', '.join(str(p) for p in plots)}")
    return results
