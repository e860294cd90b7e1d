"""`nps reproduce steering`: NP-DPO steers a small LM towards each of two conflicting users (CPU, minutes).

The paper's LLM experiments (§6.3, §6.7) need UltraFeedback, a 1.5B model and a GPU.
This experiment runs the same path end to end with exact ground truth
(``nps.data.two_styles``):

1. pretrain a small decoder (nps's own model code) on a corpus with two answer
   styles, so that it can produce both behaviours: the base / reference policy;
2. sample two responses per prompt from the base, label each pair by both users'
   programmatic rewards, keep the pairs they disagree on; option features for the
   context encoder are the base's last-token hidden states (as the paper's frozen
   LLM embeddings), reference log-probabilities are precomputed once;
3. train NP-DPO on the mixture of users, BTL-DPO on the mixture, and one BTL-DPO
   oracle per user (each on that user's labels only);
4. report the implicit-reward accuracy on unseen pairs vs N^C per user; the win rate
   of steered generations against the base's under the user's true reward, vs N^C;
   and the behaviour (share of detailed words) along the line between two users' z.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.active import particle_latents
from nps.config import check_models, config_to_dict
from nps.data import two_styles
from nps.data.episodes import EpisodeSpec
from nps.data.pairs import OptionPairPool, oracle_pools, single_user
from nps.encoder import EncoderConfig
from nps.errors import invalid
from nps.latent import interpolate
from nps.lm import Decoder, DecoderConfig, LoRAConfig, from_pretrained, save_pretrained
from nps.train.next_token import LMTrainConfig, train_language_model
from nps.models.peers import VPLConfig
from nps.models.policy import (
    PolicyConfig,
    SteerablePolicy,
    policy_kind,
    with_reference_log_probs,
)
from nps.results import (
    experiment_run,
    format_accuracy_table,
    plot_accuracy_vs_context,
    save_figure,
)
from nps.steering_run import BASE_DIR, PAIRS_FILE, SteeringRun, base_identity
from nps.train.distributed import primary_first
from nps.train.evaluate import check_unseen_targets, mean_and_sem, win_rate
from nps.train.logging import LogConfig
from nps.train.loop import TrainConfig
from nps.train.evaluate import EvalConfig

USER_NAMES = list(two_styles.USER_NAMES)
# VPL-DPO: the peer comparison's policy (nps reproduce peers covers the reward models; docs/peers.md).
MODEL_NAMES = ("np_dpo", "vpl_dpo", "btl_dpo_mixed", "oracle_detail", "oracle_caution")


@dataclasses.dataclass(frozen=True)
class SteeringConfig:
    """Defaults run on 2 CPU cores in a few minutes; every field can be set with ``--set``."""

    seed: int = 0
    language: two_styles.LanguageSpec = two_styles.LanguageSpec()
    decoder: DecoderConfig = DecoderConfig(
        model_type="qwen2", vocab_size=len(two_styles.vocabulary()), hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
    )
    corpus_size: int = 20_000
    pretrain: LMTrainConfig = LMTrainConfig(steps=600, batch_size=64, learning_rate=3e-3)
    num_prompts: int = 8_000  # two base samples each; the conflicting pairs are kept, split 80/10/10
    # β = 2 and lr 1e-3: with β 0.5 / lr 3e-3 the BTL-DPO oracles over-optimised (their samples
    # filled with prompt words, win rate < 25 %); docs/results.md has the sweep.
    policy: PolicyConfig = PolicyConfig(
        beta=2.0,
        encoder=EncoderConfig(hidden_dim=64, latent_dim=32, num_heads=4, attention_dropout=0.0),
        # VPL-DPO: VPL's encoder at NP-DPO's widths, its release's β and annealing.
        vpl=VPLConfig(hidden_dim=64, latent_dim=32),
        lora=LoRAConfig(rank=8, alpha=16.0, targets=("q", "v")),
    )
    episodes: EpisodeSpec = EpisodeSpec(num_targets=16, max_context=10)
    train: TrainConfig = TrainConfig(
        steps=300, batch_size=8, learning_rate=1e-3, optimizer="adamw", eval_every=50, checkpoint_every=100,
        val_tasks=64, grad_clip_norm=1.0,
    )
    eval: EvalConfig = EvalConfig(num_tasks=400)
    log: LogConfig = LogConfig()  # training curves, evaluation, plots, traces: --set log.backend=...
    models: tuple[str, ...] = MODEL_NAMES
    generations_per_point: int = 256  # tasks (prompt + context) per (user, N^C) for win rates
    temperature: float = 1.0
    continuum_points: int = 5

    def __post_init__(self):
        check_models(self.models, MODEL_NAMES)
        if self.decoder.vocab_size < len(two_styles.vocabulary()):
            raise invalid("decoder.vocab_size", self.decoder.vocab_size,
                          f"is smaller than the language's {len(two_styles.vocabulary())} tokens")
        for name in ("generations_per_point", "continuum_points"):
            if getattr(self, name) < 2:
                raise invalid(name, getattr(self, name), "must be at least 2")
        check_unseen_targets(self.eval.context_sizes, self.episodes)


# -- stage 1: the base LM ----------------------------------------------------------------------
def base_model(config: SteeringConfig, out: Path, echo) -> Path:
    """Pretrain (or reuse) the base LM; returns its model directory."""
    directory = out / "checkpoints" / BASE_DIR
    if (directory / "config.json").exists():
        return directory
    rng = np.random.default_rng(config.seed)
    tokens, mask = two_styles.sample_corpus(rng, config.corpus_size, config.language)
    model = Decoder(config.decoder, rngs=nnx.Rngs(config.seed))
    model, history = train_language_model(model, tokens, mask, dataclasses.replace(config.pretrain, seed=config.seed))
    echo(f"pretrained the base LM: next-token loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")
    partial = directory.with_name(directory.name + ".partial")
    save_pretrained(model, partial, config.decoder.to_hf())
    two_styles.write_tokenizer(partial)
    (partial / "pretrain_history.json").write_text(json.dumps(history))
    partial.rename(directory)  # complete or absent: a killed run pretrains again
    return directory


# -- stage 2: preference pairs from the base ------------------------------------------------------
def preference_pairs(base: Decoder, config: SteeringConfig, out: Path) -> two_styles.PreferencePairs:
    """The run's pairs of base samples with reference log-probabilities: sampled once, then stored
    with the run (``checkpoints/preference_pairs.npz``) for every later use of it."""
    path = out / "checkpoints" / PAIRS_FILE
    if path.is_file():
        return two_styles.PreferencePairs.load(path)
    pairs = two_styles.sample_preference_pairs(base, config.language, config.num_prompts, config.temperature,
                                               config.seed)
    reference = SteerablePolicy(base, config.decoder.hidden_size, dataclasses.replace(config.policy, kind="btl"),
                                rngs=nnx.Rngs(0))
    pairs = pairs._replace(options=with_reference_log_probs(reference, pairs.options, batch_size=1024))
    pairs.save(path)
    return pairs


# -- stage 4: generation -------------------------------------------------------------------------
def steered_latents(policy, pool: OptionPairPool, user: int, context_size: int, count: int, seed: int):
    """z [count, d] of ``count`` tasks of ``user`` with N^C = ``context_size`` (None for unconditioned)."""
    if policy.encoder is None:
        return None
    users_pool = OptionPairPool(single_user(pool.pairs, user), pool.options)
    return particle_latents(policy, users_pool, spec=EpisodeSpec(num_targets=1, max_context=0), num_particles=count,
                            context_size=context_size, key=jax.random.key(seed))


def generation_report(policies: dict[str, Any], base, pool: OptionPairPool, config: SteeringConfig):
    """Win rates vs the base per user and N^C, and the behaviour along the z-continuum."""
    def sample(model, prompts, seed, z=None):
        return two_styles.sample_responses(model, prompts, config.language, config.temperature, seed, z)

    count = config.generations_per_point
    prompts = two_styles.sample_prompts(np.random.default_rng(config.seed + 4), count)
    base_responses = sample(base, prompts, config.seed + 5)
    base_rewards = two_styles.user_rewards(base_responses)
    rates: dict[str, Any] = {}
    for name, policy in policies.items():
        rates[name] = {}
        sizes = config.eval.context_sizes if policy.encoder is not None else (0,)
        for size in sizes:
            rates[name][str(size)] = {}
            for user, user_name in enumerate(USER_NAMES):
                z = steered_latents(policy, pool, user, size, count, config.seed + 6 + size)
                responses = sample(policy.lm, prompts, config.seed + 7, z=z)
                rewards = two_styles.user_rewards(responses)[:, user]
                rates[name][str(size)][user_name] = win_rate(rewards, base_rewards[:, user]) | {
                    "detail_share": float(np.mean(two_styles.detail_share(responses)))
                }
    continuum = None
    if "np_dpo" in policies:
        policy = policies["np_dpo"]
        largest = max(config.eval.context_sizes)
        anchors = [jnp.mean(steered_latents(policy, pool, u, largest, count, config.seed + 8), 0) for u in (0, 1)]
        weights = np.linspace(0.0, 1.0, config.continuum_points)
        shares = []
        for z in interpolate(anchors[0], anchors[1], weights):
            responses = sample(policy.lm, prompts, config.seed + 9, z=jnp.broadcast_to(z, (count, z.shape[0])))
            shares.append(mean_and_sem(two_styles.detail_share(responses).astype(np.float64)))
        continuum = {"weight_of_caution_user": weights.tolist(), "detail_share": shares,
                     "base_detail_share": float(np.mean(two_styles.detail_share(base_responses)))}
    return rates, continuum


def format_win_table(rates: dict[str, Any]) -> str:
    header = f"{'model':<18}{'N^C':>5}" + "".join(f"{'win vs base: ' + u:>26}" for u in USER_NAMES)
    lines = [header, "-" * len(header)]
    for name, by_size in rates.items():
        for size, by_user in by_size.items():
            cells = "".join(f"{100 * by_user[u]['mean']:>19.1f} ± {100 * by_user[u]['sem']:<4.1f}" for u in USER_NAMES)
            lines.append(f"{name:<18}{size:>5}{cells}")
    return "\n".join(lines)


def plot_win_rates(rates: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(USER_NAMES), figsize=(8.4, 3.4), sharey=True)
    for ax, user in zip(axes, USER_NAMES):
        for index, (name, by_size) in enumerate(rates.items()):
            sizes = [int(s) for s in by_size]
            means = [100 * v[user]["mean"] for v in by_size.values()]
            sems = [100 * v[user]["sem"] for v in by_size.values()]
            if len(sizes) == 1:  # unconditioned policies: a level across N^C
                ax.axhline(means[0], linestyle="--", label=name, color=f"C{index}")
            else:
                ax.errorbar(sizes, means, yerr=sems, marker="o", capsize=3, label=name, color=f"C{index}")
        ax.set_title(f"{user} users")
        ax.set_xlabel("context pairs $N^C$")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("win rate vs base [%]")
    axes[-1].legend(fontsize=7)
    return save_figure(fig, path)


def plot_continuum(continuum: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.4, 3.4))
    weights = continuum["weight_of_caution_user"]
    ax.errorbar(weights, [100 * s["mean"] for s in continuum["detail_share"]],
                yerr=[100 * s["sem"] for s in continuum["detail_share"]], marker="o", capsize=3, label="NP-DPO")
    ax.axhline(100 * continuum["base_detail_share"], linestyle=":", color="gray", label="base")
    ax.set_xlabel("z = (1 − w)·z_detail + w·z_caution")
    ax.set_ylabel("detailed words among styled [%]")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def run_steering(
    config: SteeringConfig, out: str | Path, *, fresh: bool = False, progress: bool = True, echo=print
) -> dict[str, Any]:
    """The whole experiment; resumable (base, pairs, then each policy from its checkpoints)."""
    with experiment_run("steering", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        out = run.out
        base = from_pretrained(primary_first(lambda: base_model(config, out, echo), "base"), tokenizer=False)
        pairs = primary_first(lambda: preference_pairs(base.model, config, out), "pairs")
        pools = {split: OptionPairPool(pool, pairs.options) for split, pool in pairs.pools().items()}
        models, policies = {}, {}
        for name in config.models:
            kind = policy_kind(name)
            user = USER_NAMES.index(name.removeprefix("oracle_")) if name.startswith("oracle_") else None
            policy_config = dataclasses.replace(config.policy, kind=kind)
            run_config = {"policy": config_to_dict(policy_config), "data": pairs.identity,
                          "base": base_identity(base.weights_hash), "trained_on_user": user}
            fitted, models[name] = run.fit_and_evaluate(
                name, SteerablePolicy(base.model, config.decoder.hidden_size, policy_config,
                                      rngs=nnx.Rngs(config.train.seed)),
                pools if user is None else oracle_pools(pools, user),  # an oracle: its user's labels, scored on both
                kind=kind, episodes=config.episodes, train=config.train, run_config=run_config, user_names=USER_NAMES)
            policies[name] = fitted.model()
        rates, continuum = generation_report(policies, base.model, pools["test"], config)
        plots = [
            plot_accuracy_vs_context(models, USER_NAMES, out / "accuracy_vs_context.png",
                                     "steering: implicit-reward accuracy"),
            plot_win_rates(rates, out / "win_rate_vs_context.png"),
        ]
        if continuum is not None:
            plots.append(plot_continuum(continuum, out / "continuum.png"))
        return run.finish(
            tables=[format_accuracy_table(models, USER_NAMES), format_win_table(rates)], plots=plots,
            data=pairs.identity, base=base_identity(base.weights_hash), user_types=USER_NAMES, models=models,
            win_rates=rates, continuum=continuum)


def trained_run(steering_run: str, out: Path, progress: bool, echo) -> SteeringRun:
    """The steering run another experiment builds on: ``steering_run`` (a folder) if given, else the
    default run trained under ``out/steering`` (reused when it is already there)."""
    directory = Path(steering_run) if steering_run else out / "steering"
    if not (directory / "results.json").exists():
        echo(f"training the steering policies under {directory} (nps reproduce steering)")
        run_steering(SteeringConfig(), directory, progress=progress, echo=echo)
    return SteeringRun.load(directory)
