"""`nps reproduce steering`: NP-DPO steers a small LM towards each of two conflicting users (CPU, minutes).

The paper's LLM experiments (§6.3, §6.7) need UltraFeedback, a 1.5B model and a GPU.
This experiment runs the same path end to end with exact ground truth
(``nps.data.steering``):

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
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.config import check_models, config_to_dict
from nps.data import steering as two_styles
from nps.data.episodes import EpisodeSpec, OptionPairPool, PairPool, oracle_pools, sample_episodes, single_user
from nps.encoder import EncoderConfig
from nps.errors import ConfigError
from nps.experiments.report import (
    finish_run,
    format_accuracy_table,
    plot_accuracy_vs_context,
    prepare_output_dir,
    save_figure,
)
from nps.experiments.runner import EvalConfig, fit_and_evaluate
from nps.models import Decoder, DecoderConfig, LoRAConfig, SamplingConfig, from_pretrained, generate
from nps.models.generate import embed_tokens
from nps.models.loading import save_pretrained
from nps.models.policy import PolicyConfig, PolicyOptions, SteerablePolicy, with_reference_log_probs
from nps.train.evaluate import mean_and_sem
from nps.train.lm import LMTrainConfig, train_language_model
from nps.train.loop import TrainConfig

USER_NAMES = list(two_styles.USER_NAMES)
MODEL_NAMES = ("np_dpo", "btl_dpo_mixed", "oracle_detail", "oracle_caution")
BASE_DIR = "base_lm"  # under checkpoints/: the pretrained base, a Hugging Face-format model directory


@dataclasses.dataclass(frozen=True)
class SteeringConfig:
    """Defaults run on 2 CPU cores in a few minutes; every field can be set with ``--set``."""

    seed: int = 0
    language: two_styles.LanguageSpec = two_styles.LanguageSpec()
    decoder: DecoderConfig = DecoderConfig(
        model_type="qwen2", vocab_size=len(two_styles.vocabulary()), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
    )
    corpus_size: int = 20_000
    pretrain: LMTrainConfig = LMTrainConfig(steps=600, batch_size=64, learning_rate=3e-3)
    num_prompts: int = 8_000  # two base samples each; the conflicting pairs are kept, split 80/10/10
    # β = 2 and lr 1e-3: with β 0.5 / lr 3e-3 the BTL-DPO oracles over-optimised (their samples
    # filled with prompt words, win rate < 25 %); docs/results.md has the sweep.
    policy: PolicyConfig = PolicyConfig(
        beta=2.0,
        encoder=EncoderConfig(hidden_dim=64, latent_dim=32, num_heads=4, attention_dropout=0.0),
        lora=LoRAConfig(rank=8, alpha=16.0, targets=("q", "v")),
    )
    episodes: EpisodeSpec = EpisodeSpec(num_targets=16, max_context=10)
    train: TrainConfig = TrainConfig(
        steps=300, batch_size=8, learning_rate=1e-3, optimizer="adamw", eval_every=50, checkpoint_every=100,
        val_tasks=64, grad_clip_norm=1.0,
    )
    eval: EvalConfig = EvalConfig(num_tasks=400)
    models: tuple[str, ...] = MODEL_NAMES
    generations_per_point: int = 256  # tasks (prompt + context) per (user, N^C) for win rates
    temperature: float = 1.0
    continuum_points: int = 5

    def validate(self) -> None:
        check_models(self.models, MODEL_NAMES)
        self.episodes.validate()
        self.train.validate()
        self.eval.validate()
        self.pretrain.validate("pretrain")
        self.policy.validate()
        if self.decoder.vocab_size < len(two_styles.vocabulary()):
            raise ConfigError(f"decoder.vocab_size={self.decoder.vocab_size} < the language's "
                              f"{len(two_styles.vocabulary())} tokens")
        if self.generations_per_point < 2 or self.continuum_points < 2:
            raise ConfigError("generations_per_point and continuum_points must be at least 2")


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
    write_tokenizer(partial)
    (partial / "pretrain_history.json").write_text(json.dumps(history))
    partial.rename(directory)  # complete or absent: a killed run pretrains again
    return directory


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the language's vocabulary, so the base works with text tools."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(two_styles.vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.save_pretrained(str(directory))


# -- stage 2: preference pairs from the base ------------------------------------------------------
def sample_responses(model, prompts: np.ndarray, config: SteeringConfig, seed: int, z=None) -> np.ndarray:
    """Responses [N, R] (<eos> then padding) sampled at ``config.temperature``."""
    sampling = SamplingConfig(
        max_new_tokens=config.language.max_response, temperature=config.temperature,
        stop_tokens=(two_styles.EOS,), pad_token=two_styles.PAD,
    )
    return np.asarray(generate(model, prompts, sampling=sampling, seed=seed, z=z).tokens)


def preference_pools(base, config: SteeringConfig, conflicting_only: bool = True
                     ) -> tuple[dict[str, PairPool], PolicyOptions, dict[str, Any]]:
    """Pairs of base samples that the users rank oppositely (or, with ``conflicting_only=False``,
    every pair that neither user ties, as sampling produces them), split 80/10/10, and their options."""
    rng = np.random.default_rng(config.seed + 1)
    prompts = two_styles.sample_prompts(rng, config.num_prompts)
    first = sample_responses(base, prompts, config, config.seed + 2)
    second = sample_responses(base, prompts, config, config.seed + 3)
    rewards_a, rewards_b = two_styles.user_rewards(first), two_styles.user_rewards(second)
    keep = two_styles.conflicting(rewards_a, rewards_b)
    if not conflicting_only:
        keep = np.all(rewards_a != rewards_b, axis=1)
    count = int(keep.sum())
    if count < 50:
        raise ConfigError(f"only {count} conflicting pairs; raise num_prompts (now {config.num_prompts})")
    sequences = np.concatenate([np.concatenate([prompts, first], 1)[keep], np.concatenate([prompts, second], 1)[keep]])
    token_mask = np.cumsum(sequences == two_styles.EOS, axis=1) - (sequences == two_styles.EOS) == 0
    token_mask &= sequences != two_styles.PAD
    response_mask = token_mask & (np.arange(sequences.shape[1]) >= two_styles.PROMPT_LENGTH)
    features = embed_tokens(base, [row[m] for row, m in zip(sequences, token_mask)], batch_size=512)
    options = PolicyOptions(
        tokens=jnp.asarray(sequences), token_mask=jnp.asarray(token_mask), response_mask=jnp.asarray(response_mask),
        features=jnp.asarray(features), reference_log_prob=jnp.full((2 * count,), jnp.nan, jnp.float32),
    )
    order = rng.permutation(count)
    bounds = {"train": (0, int(0.8 * count)), "val": (int(0.8 * count), int(0.9 * count)), "test": (int(0.9 * count), count)}
    pools = {}
    for split, (lo, hi) in bounds.items():
        index = order[lo:hi]
        pools[split] = PairPool(
            option_a=jnp.asarray(index[:, None], jnp.int32), option_b=jnp.asarray(index[:, None] + count, jnp.int32),
            utility_a=jnp.asarray(rewards_a[keep][index]), utility_b=jnp.asarray(rewards_b[keep][index]),
        )
    identity = {
        "name": "steering-two-styles", "seed": config.seed, "num_prompts": config.num_prompts,
        "conflicting_pairs": count, "conflict_share_of_sampled_pairs": count / config.num_prompts,
        "split_sizes": {k: v.num_pairs for k, v in pools.items()},
    }
    return pools, options, identity


# -- stage 3: policies -----------------------------------------------------------------------------
def build_policy(base_dir: Path, kind: str, config: SteeringConfig) -> SteerablePolicy:
    decoder = from_pretrained(base_dir, tokenizer=False).model
    policy_config = dataclasses.replace(config.policy, kind=kind)
    return SteerablePolicy(decoder, config.decoder.hidden_size, policy_config, rngs=nnx.Rngs(config.train.seed))


# -- stage 4: generation -------------------------------------------------------------------------
def steered_latents(policy, pool: OptionPairPool, user: int, context_size: int, count: int, seed: int):
    """z [count, d] of ``count`` tasks of ``user`` with N^C = ``context_size`` (None for unconditioned)."""
    if policy.encoder is None:
        return None
    spec = EpisodeSpec(num_targets=max(context_size, 1), max_context=context_size)
    users_pool = OptionPairPool(single_user(pool.pairs, user), pool.options)
    episodes = sample_episodes(jax.random.key(seed), users_pool, spec, count, context_size)
    return policy.encode_context(episodes)


def win_rate(policy_rewards: np.ndarray, base_rewards: np.ndarray) -> dict[str, float]:
    """P(policy > base) + ½ P(tie) under the true reward, mean ± s.e. over generations."""
    wins = (policy_rewards > base_rewards) + 0.5 * (policy_rewards == base_rewards)
    return mean_and_sem(wins.astype(np.float64))


def generation_report(policies: dict[str, Any], base, options, test_pool: PairPool, config: SteeringConfig):
    """Win rates vs the base per user and N^C, and the behaviour along the z-continuum."""
    count = config.generations_per_point
    prompts = two_styles.sample_prompts(np.random.default_rng(config.seed + 4), count)
    base_responses = sample_responses(base, prompts, config, config.seed + 5)
    base_rewards = two_styles.user_rewards(base_responses)
    pool = OptionPairPool(test_pool, options)
    rates: dict[str, Any] = {}
    for name, policy in policies.items():
        rates[name] = {}
        sizes = config.eval.context_sizes if policy.encoder is not None else (0,)
        for size in sizes:
            rates[name][str(size)] = {}
            for user, user_name in enumerate(USER_NAMES):
                z = steered_latents(policy, pool, user, size, count, config.seed + 6 + size)
                responses = sample_responses(policy.lm, prompts, config, config.seed + 7, z=z)
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
        for weight in weights:
            z = jnp.broadcast_to((1 - weight) * anchors[0] + weight * anchors[1], (count, anchors[0].shape[0]))
            responses = sample_responses(policy.lm, prompts, config, config.seed + 9, z=z)
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
    """The whole experiment; resumable (base, then each policy from its checkpoints)."""
    config.validate()
    start = time.perf_counter()
    out = prepare_output_dir(out, fresh)
    base_dir = base_model(config, out, echo)
    base = from_pretrained(base_dir, tokenizer=False)
    pools, options, data_identity = preference_pools(base.model, config)
    reference = build_policy(base_dir, "btl", config)
    options = with_reference_log_probs(reference, options, batch_size=1024)
    base_identity = {"path": BASE_DIR, "weights_hash": base.weights_hash}
    models, policies = {}, {}
    for name in config.models:
        kind = "np" if name == "np_dpo" else "btl"
        user = USER_NAMES.index(name.removeprefix("oracle_")) if name.startswith("oracle_") else None
        train_pools = {split: OptionPairPool(pool, options) for split, pool in pools.items()}
        if user is not None:  # an oracle: trained on its user's labels, scored on both users
            train_pools = oracle_pools(train_pools, user)
        run_config = {"policy": config_to_dict(dataclasses.replace(config.policy, kind=kind)), "data": data_identity,
                      "base": base_identity, "trained_on_user": user}
        fitted, models[name] = fit_and_evaluate(
            name, build_policy(base_dir, kind, config), kind, run_config, train_pools, config.episodes, config.train,
            config.eval, out, USER_NAMES, progress=progress,
        )
        policies[name] = fitted.model()
    rates, continuum = generation_report(policies, base.model, options, pools["test"], config)
    plots = [
        plot_accuracy_vs_context(models, USER_NAMES, out / "accuracy_vs_context.png",
                                 "steering: implicit-reward accuracy"),
        plot_win_rates(rates, out / "win_rate_vs_context.png"),
    ]
    if continuum is not None:
        plots.append(plot_continuum(continuum, out / "continuum.png"))
    return finish_run(
        out, start, echo, tables=[format_accuracy_table(models, USER_NAMES), format_win_table(rates)], plots=plots,
        experiment="steering", config=config_to_dict(config), data=data_identity, base=base_identity,
        user_types=USER_NAMES, models=models, win_rates=rates, continuum=continuum,
    )


# -- using a trained run: encode a user once, then generate or score ------------------------------
@dataclasses.dataclass
class SteeringRun:
    """A policy trained by ``run_steering``, loaded for use (the `nps generate` backend).

    ``encode_user`` turns a user's pairs into z once; ``generate`` and ``log_prob`` then
    serve any number of prompts for that user (or for an explicit or interpolated z).
    """

    policy: SteerablePolicy
    base: Decoder
    config: SteeringConfig
    model_name: str

    @classmethod
    def load(cls, run_dir: str | Path, model: str = "np_dpo") -> SteeringRun:
        from nps.config import config_from_dict
        from nps.train.loop import load_trained

        run_dir = Path(run_dir)
        results_path = run_dir / "results.json"
        if not results_path.exists():
            raise ConfigError(f"{results_path}: missing; run `nps reproduce steering --out {run_dir}` first")
        results = json.loads(results_path.read_text())
        if results.get("experiment") != "steering":
            raise ConfigError(f"{results_path}: a {results.get('experiment')!r} run, not a steering run")
        config = config_from_dict(SteeringConfig, results["config"])
        if model not in config.models:
            raise ConfigError(f"--model {model!r} was not trained in {run_dir}; trained: {', '.join(config.models)}")
        base_dir = run_dir / "checkpoints" / BASE_DIR
        base = from_pretrained(base_dir, tokenizer=False)
        kind = "np" if model == "np_dpo" else "btl"
        policy = load_trained(
            build_policy(base_dir, kind, config), run_dir / "checkpoints" / model, config.train,
            run_config={"base": {"path": BASE_DIR, "weights_hash": base.weights_hash}},
        )
        return cls(policy, base.model, config, model)

    def pair_features(self, pairs: list[dict[str, str]]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A context of one user: chosen and rejected features [1, C, E] (the base's last-token
        states, as the encoders read options) and the mask [1, C]; C ≥ 1 (an empty context is a
        mask over one unused slot)."""
        chosen = [two_styles.option_tokens(p["prompt"], p["chosen"], f"pairs[{i}]") for i, p in enumerate(pairs)]
        rejected = [two_styles.option_tokens(p["prompt"], p["rejected"], f"pairs[{i}]") for i, p in enumerate(pairs)]
        capacity = max(len(pairs), 1)
        features = np.zeros((2, capacity, self.config.decoder.hidden_size), np.float32)
        if pairs:
            features[:, : len(pairs)] = embed_tokens(self.base, chosen + rejected).reshape(2, len(pairs), -1)
        mask = jnp.arange(capacity)[None] < len(pairs)
        return jnp.asarray(features[:1]), jnp.asarray(features[1:]), mask

    def response_features(self, prompts: list[str], responses: list[str]) -> jax.Array:
        """Features [N, E] of prompt + response options (the base's last-token states)."""
        options = [two_styles.option_tokens(p, r) for p, r in zip(prompts, responses)]
        return jnp.asarray(embed_tokens(self.base, options))

    def particles(self, count: int = 256, context_size: int = 10, seed: int = 0) -> jax.Array:
        """z [count, d] of plausible users: the policy's latents for tasks of the run's validation pairs."""
        from nps.active import particle_latents

        pools, options, _ = preference_pools(self.base, self.config)
        return particle_latents(self.policy, OptionPairPool(pools["val"], options), self.config.episodes, count,
                                context_size, seed)

    def options(self, prompts: list[str], responses: list[str]) -> PolicyOptions:
        """Prompt + response options [N] as the policy scores them: tokens, masks, the encoder's
        features and the reference log-probabilities."""
        ids = [two_styles.option_tokens(p, r, f"options[{i}]") for i, (p, r) in enumerate(zip(prompts, responses))]
        width = max(len(row) for row in ids)
        tokens = np.full((len(ids), width), two_styles.PAD, np.int32)
        token_mask = np.zeros((len(ids), width), bool)
        response_mask = np.zeros((len(ids), width), bool)
        for row, (prompt, sequence) in enumerate(zip(prompts, ids)):
            tokens[row, : len(sequence)], token_mask[row, : len(sequence)] = sequence, True
            response_mask[row, len(two_styles.encode_words(prompt)) + 2 : len(sequence)] = True  # after <bos> … SEP
        options = PolicyOptions(jnp.asarray(tokens), jnp.asarray(token_mask), jnp.asarray(response_mask),
                                self.response_features(prompts, responses), jnp.zeros((len(ids),), jnp.float32))
        return with_reference_log_probs(self.policy, options)

    def encode_user(self, pairs: list[dict[str, str]]) -> jax.Array | None:
        """z [d] from a user's pairs ({"prompt", "chosen", "rejected"}; may be empty); None if unconditioned."""
        if self.policy.encoder is None:
            return None
        return self.policy.encode(*self.pair_features(pairs))[0]

    def generate(
        self, prompts: list[str], z: jax.Array | None = None, *, seed: int = 0, temperature: float | None = None,
        base: bool = False,
    ) -> list[str]:
        """One sampled response per prompt, steered by z [d] (None: the policy without a user);
        ``base``: the pretrained base instead (no adapters, no user)."""
        ids = [[two_styles.BOS, *two_styles.encode_words(p, "prompt"), two_styles.SEP] for p in prompts]
        width = max(len(i) for i in ids)
        tokens = np.zeros((len(ids), width), np.int32)
        mask = np.zeros((len(ids), width), bool)
        for row, seq in enumerate(ids):
            tokens[row, width - len(seq) :], mask[row, width - len(seq) :] = seq, True
        config = self.config if temperature is None else dataclasses.replace(self.config, temperature=temperature)
        batch_z = None if z is None else jnp.broadcast_to(z, (len(ids), z.shape[-1]))
        sampling = SamplingConfig(max_new_tokens=config.language.max_response, temperature=config.temperature,
                                  stop_tokens=(two_styles.EOS,), pad_token=two_styles.PAD)
        if base:
            out = generate(self.base, tokens, mask, sampling=sampling, seed=seed)
        else:
            out = generate(self.policy.lm, tokens, mask, sampling=sampling, seed=seed, z=batch_z)
        return [two_styles.decode_response(row) for row in np.asarray(out.tokens)]

    def log_prob(self, prompt: str, response: str, z: jax.Array | None = None) -> float:
        """log π(response | prompt, z) under the steered policy."""
        return float(self.policy.log_probs(self.options([prompt], [response]), None if z is None else z[None])[0])
