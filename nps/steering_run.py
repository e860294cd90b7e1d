"""A trained steering run, loaded for use: encode a user once, then generate, score or ask.

``nps reproduce steering`` writes a run folder: ``results.json`` (its config), the base LM under
``checkpoints/base_lm`` (a Hugging Face-format model), the sampled preference pairs
(``checkpoints/preference_pairs.npz``) and each policy's checkpoints. ``SteeringRun.load``
rebuilds a policy from those files alone; ``nps generate``, ``nps collect --active``,
``nps ab``, ``nps reproduce active`` and the preference app all go through it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.active import informative_chooser, particle_latents
from nps.config import config_from_dict
from nps.data import two_styles
from nps.data.episodes import EpisodeSpec, context_capacity
from nps.data.pairs import OptionPairPool, PolicyOptions
from nps.data.profiles import read_candidates
from nps.errors import ConfigError
from nps.files import texts_digest
from nps.lm import Decoder, SamplingConfig, embed_tokens, from_pretrained, generate
from nps.lm.generate import pad_sequences
from nps.models.interface import context_latents
from nps.models.policy import (
    PolicyConfig,
    SteerablePolicy,
    policy_kind,
    with_reference_log_probs,
)
from nps.train.checkpoint import state_digest
from nps.train.loop import TrainConfig, load_trained

BASE_DIR = "base_lm"  # under checkpoints/: the pretrained base, a Hugging Face-format model directory
PAIRS_FILE = "preference_pairs.npz"  # under checkpoints/: the run's sampled preference pairs


def base_identity(weights_hash: str) -> dict[str, str]:
    """What a steering policy's checkpoints record about the base they adapt."""
    return {"path": BASE_DIR, "weights_hash": weights_hash}


@dataclasses.dataclass
class SteeringRun:
    """A policy trained by ``nps reproduce steering``, with the base it adapts and the run's settings.

    ``encode_user`` turns a user's pairs into z once; ``generate`` and ``log_prob`` then serve any
    number of prompts for that user (or for an explicit or interpolated z).
    """

    policy: SteerablePolicy
    base: Decoder
    spec: two_styles.LanguageSpec
    temperature: float
    episodes: EpisodeSpec
    model_name: str
    directory: Path
    weights_hash: str

    @classmethod
    def load(cls, run_dir: str | Path, model: str = "np_dpo") -> SteeringRun:
        run_dir = Path(run_dir)
        results_path = run_dir / "results.json"
        if not results_path.is_file():
            raise ConfigError(f"{results_path}: missing; run `nps reproduce steering --out {run_dir}` first")
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError(f"{results_path}: not valid JSON ({error}); rerun the experiment") from None
        if not isinstance(results, dict) or results.get("experiment") != "steering":
            kind = results.get("experiment") if isinstance(results, dict) else None
            raise ConfigError(f"{results_path}: a {kind!r} run, not a steering run")
        config = results["config"]
        if model not in config["models"]:
            raise ConfigError(f"--model {model!r} was not trained in {run_dir}; trained: {', '.join(config['models'])}")
        base = from_pretrained(run_dir / "checkpoints" / BASE_DIR, tokenizer=False)
        policy_config = dataclasses.replace(config_from_dict(PolicyConfig, config["policy"], "policy"),
                                            kind=policy_kind(model))
        train = config_from_dict(TrainConfig, config["train"], "train")
        policy = SteerablePolicy(base.model, base.config.hidden_size, policy_config, rngs=nnx.Rngs(train.seed))
        policy = load_trained(policy, run_dir / "checkpoints" / model, train,
                              run_config={"base": base_identity(base.weights_hash)})
        return cls(policy, base.model, config_from_dict(two_styles.LanguageSpec, config["language"], "language"),
                   float(config["temperature"]), config_from_dict(EpisodeSpec, config["episodes"], "episodes"),
                   model, run_dir, base.weights_hash)

    @functools.cached_property
    def fingerprint(self) -> str:
        """This run's identity wherever a z it inferred is recorded: a digest of the policy's name,
        the base's weights hash and the trained parameters' bytes (another training, another fingerprint)."""
        trained = state_digest(nnx.to_pure_dict(nnx.state(self.policy, nnx.Param)))
        return texts_digest([self.model_name, self.weights_hash, trained])

    @property
    def conditioned(self) -> bool:
        """Whether this policy takes a user (NP-DPO) or serves everyone alike (the DPO baselines)."""
        return self.policy.encoder is not None

    def preference_pairs(self) -> two_styles.PreferencePairs:
        """The pairs the run sampled from its base (with reference log-probabilities), as stored."""
        path = self.directory / "checkpoints" / PAIRS_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing; run `nps reproduce steering --out {self.directory}` again to "
                              "store the run's preference pairs (trained policies are kept)")
        return two_styles.PreferencePairs.load(path)

    def sampled_candidates(self, count: int, split: str = "test", seed: int = 0) -> list[dict[str, Any]]:
        """``count`` of the run's sampled pairs of ``split`` as a candidate set, ``{"prompt", "responses":
        [a, b]}``: pairs as sampling produced them (the two users rank some oppositely, others alike),
        leaving out responses that are empty, equal or hold a special token (nothing a person should read)."""
        pairs = self.preference_pairs()
        words, special = two_styles.vocabulary(), set(two_styles.SPECIAL_TOKENS)
        tokens = np.asarray(pairs.options.tokens)
        candidates = []
        for pair in np.random.default_rng(seed).permutation(pairs.splits["all"][split]):
            rows = tokens[pair], tokens[pair + pairs.num_pairs]
            responses = [two_styles.decode_response(row[two_styles.PROMPT_LENGTH:]) for row in rows]
            if any(not r or special & set(r.split()) for r in responses) or responses[0] == responses[1]:
                continue
            prompt = " ".join(words[t] for t in rows[0][1 : two_styles.PROMPT_LENGTH - 1])
            candidates.append({"prompt": prompt, "responses": responses})
            if len(candidates) == count:
                return candidates
        raise ConfigError(f"the run's {split} split has {len(candidates)} readable pairs; ask for at most that many")

    # -- features as the encoders read them -----------------------------------------------------
    def check_lengths(self, sequences: Sequence[Sequence[int]], what: str, room: int = 0) -> None:
        """Every sequence (plus ``room`` tokens still to generate) fits the model's positions."""
        limit = self.base.config.max_position_embeddings
        for index, sequence in enumerate(sequences):
            if len(sequence) + room > limit:
                raise ConfigError(f"{what}[{index}] has {len(sequence)} tokens" + (f" plus {room} to generate" if room
                                  else "") + f", more than this model's {limit} positions; shorten it")

    def features(self, sequences: Sequence[Sequence[int]], what: str = "options") -> np.ndarray:
        """The base's last-token states [N, E] of token sequences: the context encoder's option features."""
        self.check_lengths(sequences, what)
        return embed_tokens(self.base, sequences)

    def pair_features(self, pairs: list[dict[str, str]]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A context of one user: chosen and rejected features [1, C, E] and the mask [1, C], with
        C = ``context_capacity(len(pairs))`` (an empty context is a mask over unused slots)."""
        chosen = [two_styles.option_tokens(p["prompt"], p["chosen"], f"pairs[{i}]") for i, p in enumerate(pairs)]
        rejected = [two_styles.option_tokens(p["prompt"], p["rejected"], f"pairs[{i}]") for i, p in enumerate(pairs)]
        capacity = context_capacity(len(pairs))
        features = np.zeros((2, capacity, self.base.config.hidden_size), np.float32)
        if pairs:
            features[:, : len(pairs)] = self.features(chosen + rejected, "pairs").reshape(2, len(pairs), -1)
        mask = jnp.arange(capacity)[None] < len(pairs)
        return jnp.asarray(features[:1]), jnp.asarray(features[1:]), mask

    def option_features(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Features [N, E] of prompt + response options (the base's last-token states)."""
        return self.features([two_styles.option_tokens(p, r) for p, r in zip(prompts, responses)])

    def options(self, prompts: list[str], responses: list[str]) -> PolicyOptions:
        """Prompt + response options [N] as the policy scores them: tokens, masks, the encoder's
        features and the reference log-probabilities."""
        ids = [two_styles.option_tokens(p, r, f"options[{i}]") for i, (p, r) in enumerate(zip(prompts, responses))]
        tokens, token_mask = pad_sequences(ids, left=False, pad=two_styles.PAD)
        prompt_ends = np.asarray([len(two_styles.encode_words(p)) + 2 for p in prompts])  # <bos> prompt Assistant:
        response_mask = token_mask & (np.arange(tokens.shape[1])[None] >= prompt_ends[:, None])
        options = PolicyOptions(jnp.asarray(tokens), jnp.asarray(token_mask), jnp.asarray(response_mask),
                                jnp.asarray(self.features(ids)), jnp.zeros((len(ids),), jnp.float32))
        return with_reference_log_probs(self.policy, options)

    def _option_pairs(self, prompts: list[str], first: list[str],
                      second: list[str]) -> tuple[PolicyOptions, PolicyOptions]:
        """Options [N] of two responses per prompt, built as one table so that both share a padded width."""
        both = self.options(prompts * 2, first + second)
        count = len(prompts)
        return (jax.tree.map(lambda x: x[:count], both), jax.tree.map(lambda x: x[count:], both))

    def candidate_options(self, candidates: list[dict[str, Any]]) -> tuple[PolicyOptions, PolicyOptions]:
        """Options of each candidate's first and second response (``{"prompt", "responses": [a, b]}``)."""
        return self._option_pairs([c["prompt"] for c in candidates], [c["responses"][0] for c in candidates],
                                  [c["responses"][1] for c in candidates])

    def pair_options(self, pairs: list[dict[str, str]]) -> tuple[PolicyOptions, PolicyOptions]:
        """Options [N] of each answered pair's chosen and rejected response ({"prompt", "chosen", "rejected"})."""
        return self._option_pairs([p["prompt"] for p in pairs], [p["chosen"] for p in pairs],
                                  [p["rejected"] for p in pairs])

    # -- users -----------------------------------------------------------------------------------
    def encode_user(self, pairs: list[dict[str, str]]) -> jax.Array | None:
        """z [d] from a user's pairs ({"prompt", "chosen", "rejected"}; may be empty); None if unconditioned."""
        if not self.conditioned:
            return None
        chosen, rejected, mask = self.pair_features(pairs)
        return context_latents(self.policy, PolicyOptions.of_features(chosen), PolicyOptions.of_features(rejected),
                               mask)[0]

    def particles(self, count: int = 256, context_size: int = 10, seed: int = 0) -> jax.Array:
        """z [count, d] of plausible users: the policy's latents for tasks of the run's validation pairs."""
        pairs = self.preference_pairs()
        return particle_latents(self.policy, OptionPairPool(pairs.pools()["val"], pairs.options),
                                         spec=self.episodes, num_particles=count, context_size=context_size,
                                         key=jax.random.key(seed))

    def informative_order(self, candidates_path: str | Path):
        """A ``next_candidate`` for ``nps.data.profiles.collect`` over the candidate set at ``candidates_path``:
        the most informative pair first, judged by this run's policy (``nps.active.informative_chooser``)."""
        candidates, _ = read_candidates(candidates_path)
        return informative_chooser(self.policy, self.particles(), *self.candidate_options(candidates))

    def latent_range(self) -> tuple[float, float]:
        """The smallest and the largest coordinate of the z's the encoder gives the run's plausible users
        (``particles``): where the policy was trained to be steered."""
        particles = np.asarray(self.particles())
        return float(particles.min()), float(particles.max())

    # -- generation and scores ---------------------------------------------------------------------
    def sampling(self, temperature: float | None = None) -> SamplingConfig:
        """How this run samples responses, at ``temperature`` (None: the run's own); a temperature that is
        not a finite number ≥ 0 is a ``ConfigError``."""
        return two_styles.sampling(self.spec, self.temperature if temperature is None else temperature)

    def generate(
        self, prompts: list[str], z: jax.Array | None = None, *, seed: int = 0, temperature: float | None = None,
        base: bool = False,
    ) -> list[str]:
        """One sampled response per prompt, steered by z [d] (None: the policy without a user);
        ``base``: the pretrained base instead (no adapters, no user)."""
        ids = [[two_styles.BOS, *two_styles.encode_words(p, "prompt"), two_styles.SEP] for p in prompts]
        sampling = self.sampling(temperature)
        self.check_lengths(ids, "prompts", room=sampling.max_new_tokens)
        tokens, mask = pad_sequences(ids, left=True, pad=two_styles.PAD)
        if base:
            out = generate(self.base, tokens, mask, sampling=sampling, seed=seed)
        else:
            if z is not None and not bool(jnp.all(jnp.isfinite(z))):
                raise ConfigError("z has non-finite values (NaN or inf); pass a finite latent")
            batch_z = None if z is None else jnp.broadcast_to(z, (len(ids), z.shape[-1]))
            out = generate(self.policy.lm, tokens, mask, sampling=sampling, seed=seed, z=batch_z)
        return [two_styles.decode_response(row) for row in np.asarray(out.tokens)]

    def log_prob(self, prompt: str, response: str, z: jax.Array | None = None) -> float:
        """log π(response | prompt, z) under the steered policy."""
        return float(self.policy.log_probs(self.options([prompt], [response]), None if z is None else z[None])[0])


def load_baseline(spec: str) -> tuple[str, SteeringRun | None]:
    """``--baseline``: "base" (the unconditioned base LM; None) or RUN_DIR[:MODEL] (another run's policy)."""
    if spec == "base":
        return "base", None
    run_dir, _, model = spec.partition(":")
    return spec, SteeringRun.load(run_dir, model or "np_dpo")
