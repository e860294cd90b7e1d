"""A trained steerable-policy run, loaded for use: encode a user once, then generate, score or ask.

Every experiment that trains NP-DPO policies writes a run folder that ``SteeringRun.load`` rebuilds a
policy from, whatever its base model; ``nps generate``, ``nps collect --active``, ``nps ab``,
``nps profile check``, ``nps reproduce active`` and the preference app all go through it. A loaded run
holds:

- the **policy** (LoRA + FiLM + context encoder) on its **base** decoder, checked against the base's
  weights hash that its checkpoints recorded;
- its **text codec**: how a prompt becomes the tokens a reply continues, how a prompt + response
  becomes the tokens the policy scores, when generation stops and how tokens become text
  (``nps.lm.text.ChatCodec`` for a Hugging Face model with its chat template, as training tokenised;
  ``nps.data.two_styles.TwoStylesCodec`` for the steering experiment's language);
- its **option embedder**: the frozen model and tokenisation whose last-token states are the encoder's
  option features, as training computed them (for ``hh-dpo``: the recorded embedder, whose weights,
  dtype, architecture, recipe and maximum length are checked against the run's record on load);
- the pairs it trained on (``data``: loaded on first use) and its settings.

Run kinds by ``results.json``'s ``experiment``: ``steering`` (the base under ``checkpoints/base_lm``, the
sampled pairs in ``checkpoints/preference_pairs.npz``) and ``hh-dpo`` (the base and the embedder where
``config.model`` / ``config.embedder`` name them, the prepared UltraFeedback pairs and their cached features).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

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
from nps.lm.text import ChatCodec
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
RUN_KINDS = ("steering", "hh-dpo")  # experiments whose runs load here
HH_DPO_TEMPERATURE = 1.0  # an hh-dpo run samples its policy as it is (no temperature was trained)


def base_identity(weights_hash: str) -> dict[str, str]:
    """What a steering policy's checkpoints record about the base they adapt."""
    return {"path": BASE_DIR, "weights_hash": weights_hash}


def stored_pairs(run_dir: str | Path) -> two_styles.PreferencePairs:
    """A steering run's sampled pairs (with reference log-probabilities), as stored."""
    path = Path(run_dir) / "checkpoints" / PAIRS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: missing; run `nps reproduce steering --out {run_dir}` again to "
                          "store the run's preference pairs (trained policies are kept)")
    return two_styles.PreferencePairs.load(path)


def check_lengths(model: Decoder, sequences: Sequence[Sequence[int]], what: str, room: int = 0) -> None:
    """Every sequence (plus ``room`` tokens still to generate) fits ``model``'s positions."""
    limit = model.config.max_position_embeddings
    for index, sequence in enumerate(sequences):
        if len(sequence) + room > limit:
            raise ConfigError(f"{what}[{index}] has {len(sequence)} tokens" + (f" plus {room} to generate" if room
                              else "") + f", more than this model's {limit} positions; shorten it")


@dataclasses.dataclass(frozen=True)
class OptionEmbedder:
    """The context encoder's option features: ``model``'s last-token states [N, E] of each prompt +
    response as ``tokenize(prompts, responses, what)`` turns them into token ids (training's recipe)."""

    model: Decoder
    tokenize: Callable[[Sequence[str], Sequence[str], str], list[list[int]]]

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], what: str = "options") -> np.ndarray:
        ids = self.tokenize(prompts, responses, what)
        check_lengths(self.model, ids, what)
        return embed_tokens(self.model, ids)


class RunData(NamedTuple):
    """The pairs a run trained on: per split, pairs over one table of options (``PolicyOptions`` whose
    ``features`` are the encoder's; its other fields hold what the run stored), and their identity."""

    pools: dict[str, OptionPairPool]
    identity: dict[str, Any]


def trained_user_types(run_dir: str | Path) -> tuple[str, ...]:
    """The user types a run's pairs were labelled by (read from its results, nothing loaded)."""
    return tuple(_read_results(Path(run_dir))["user_types"])


def _read_results(run_dir: Path) -> dict[str, Any]:
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise ConfigError(f"{results_path}: missing; run `nps reproduce steering --out {run_dir}` (or `nps reproduce "
                          f"hh-dpo --model MODEL --data DATA --out {run_dir}`) first")
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(f"{results_path}: not valid JSON ({error}); rerun the experiment") from None
    kind = results.get("experiment") if isinstance(results, dict) else None
    if kind not in RUN_KINDS:
        raise ConfigError(f"{results_path}: a {kind!r} run, not one of a steerable policy "
                          f"({' or '.join(RUN_KINDS)})")
    return results


@dataclasses.dataclass
class SteeringRun:
    """A trained steerable policy with its base, text codec, option embedder and the run's settings.

    ``encode_user`` turns a user's pairs into z once; ``generate`` and ``log_prob`` then serve any
    number of prompts for that user (or for an explicit or interpolated z).
    """

    policy: SteerablePolicy
    base: Decoder
    codec: Any  # ChatCodec or TwoStylesCodec (see the module's docstring)
    embedder: OptionEmbedder
    temperature: float
    episodes: EpisodeSpec
    model_name: str
    directory: Path
    weights_hash: str
    experiment: str
    user_types: tuple[str, ...]
    load_data: Callable[[], RunData]

    @classmethod
    def load(cls, run_dir: str | Path, model: str = "np_dpo") -> SteeringRun:
        run_dir = Path(run_dir)
        results = _read_results(run_dir)
        config = results["config"]
        if model not in _trained_models(config, results):
            raise ConfigError(f"--model {model!r} was not trained in {run_dir}; trained: "
                              f"{', '.join(_trained_models(config, results))}")
        policy_config = dataclasses.replace(config_from_dict(PolicyConfig, config["policy"], "policy"),
                                            kind=policy_kind(model))
        train = config_from_dict(TrainConfig, config["train"], "train")
        episodes = config_from_dict(EpisodeSpec, config["episodes"], "episodes")
        loader = _load_steering if results["experiment"] == "steering" else _load_hh_dpo
        base, codec, embedder, temperature, recorded_base, load_data = loader(run_dir, results)
        policy = SteerablePolicy(base.model, embedder.dim, policy_config, rngs=nnx.Rngs(train.seed))
        policy = load_trained(policy, run_dir / "checkpoints" / model, train, run_config={"base": recorded_base})
        return cls(policy, base.model, codec, embedder, temperature, episodes, model, run_dir, base.weights_hash,
                   results["experiment"], tuple(results["user_types"]), load_data)

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

    @functools.cached_property
    def data(self) -> RunData:
        """The pairs the run trained on (read on first use)."""
        return self.load_data()

    def feature_pools(self) -> dict[str, OptionPairPool]:
        """The run's pairs per split with each option as its encoder features [M, E]: the steering
        reward task, on which a reward model (NP-BTL, a peer) is trained and scored."""
        return {split: OptionPairPool(pool.pairs, pool.options.features) for split, pool in self.data.pools.items()}

    # -- features as the encoders read them -----------------------------------------------------
    def pair_features(self, pairs: list[dict[str, str]]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A context of one user: chosen and rejected features [1, C, E] and the mask [1, C], with
        C = ``context_capacity(len(pairs))`` (an empty context is a mask over unused slots)."""
        capacity = context_capacity(len(pairs))
        features = np.zeros((2, capacity, self.embedder.dim), np.float32)
        if pairs:
            prompts = [p["prompt"] for p in pairs] * 2
            responses = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
            features[:, : len(pairs)] = self.embedder(prompts, responses, "pairs").reshape(2, len(pairs), -1)
        mask = jnp.arange(capacity)[None] < len(pairs)
        return jnp.asarray(features[:1]), jnp.asarray(features[1:]), mask

    def option_features(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """The encoder's features [N, E] of prompt + response options."""
        return self.embedder(prompts, responses)

    def options(self, prompts: list[str], responses: list[str]) -> PolicyOptions:
        """Prompt + response options [N] as the policy scores them: tokens, masks, the encoder's
        features and the reference log-probabilities."""
        rows = [self.codec.option_ids(p, r, f"options[{i}]") for i, (p, r) in enumerate(zip(prompts, responses))]
        ids = [row for row, _ in rows]
        check_lengths(self.base, ids, "options")
        tokens, token_mask = pad_sequences(ids, left=False, pad=self.codec.pad)
        starts = np.asarray([start for _, start in rows])
        response_mask = token_mask & (np.arange(tokens.shape[1])[None] >= starts[:, None])
        options = PolicyOptions(jnp.asarray(tokens), jnp.asarray(token_mask), jnp.asarray(response_mask),
                                jnp.asarray(self.option_features(prompts, responses)),
                                jnp.zeros((len(ids),), jnp.float32))
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

    def particles(self, count: int = 256, context_size: int | None = None, seed: int = 0) -> jax.Array:
        """z [count, d] of plausible users: the policy's latents for tasks of the run's validation pairs, each
        with ``context_size`` context pairs (None: the largest context the policy was trained on)."""
        size = self.episodes.max_context if context_size is None else context_size
        return particle_latents(self.policy, self.data.pools["val"], spec=self.episodes,
                                num_particles=count, context_size=size, key=jax.random.key(seed))

    def informative_order(self, candidates_path: str | Path):
        """A ``next_candidate`` for ``nps.data.profiles.collect`` over the candidate set at ``candidates_path``:
        the most informative pair first, judged by this run's policy (``nps.active.informative_chooser``)."""
        candidates, _ = read_candidates(candidates_path)
        try:
            options = self.candidate_options(candidates)
        except ConfigError as error:
            raise ConfigError(f"{candidates_path}: {error}") from None
        return informative_chooser(self.policy, self.particles(), *options)

    def latent_range(self) -> tuple[float, float]:
        """The smallest and the largest coordinate of the z's the encoder gives the run's plausible users
        (``particles``): where the policy was trained to be steered."""
        particles = np.asarray(self.particles())
        return float(particles.min()), float(particles.max())

    # -- generation and scores ---------------------------------------------------------------------
    def sampling(self, temperature: float | None = None) -> SamplingConfig:
        """How this run samples responses, at ``temperature`` (None: the run's own); a temperature that is
        not a finite number ≥ 0 is a ``ConfigError``."""
        return self.codec.sampling(self.temperature if temperature is None else temperature)

    def generate(
        self, prompts: list[str], z: jax.Array | None = None, *, seed: int | Sequence[int] = 0,
        temperature: float | None = None, base: bool = False, width: int | None = None,
    ) -> list[str]:
        """One sampled response per prompt, steered by z [d] (every prompt) or [N, d] (one per prompt;
        None: the policy without a user); ``base``: the pretrained base instead (no adapters, no user).
        ``seed``: one for the batch, or one per prompt (each reply then depends on its own prompt, z and
        seed alone, whatever it is batched with: ``nps.serve.batching``). ``width``: prompts padded to at
        least this many tokens (fewer shapes to compile). Prompts are templated by the codec as training
        did; a reply stops at the codec's end-of-turn tokens."""
        ids = [self.codec.prompt_ids(p, "prompt") for p in prompts]
        sampling = self.sampling(temperature)
        check_lengths(self.base, ids, "prompts", room=sampling.max_new_tokens)
        tokens, mask = pad_sequences(ids, left=True, pad=self.codec.pad, width=width)
        if not isinstance(seed, int):
            seed = jax.vmap(jax.random.key)(jnp.asarray(seed, jnp.int32))
        if base:
            out = generate(self.base, tokens, mask, sampling=sampling, seed=seed)
        else:
            if z is not None and not bool(jnp.all(jnp.isfinite(z))):
                raise ConfigError("z has non-finite values (NaN or inf); pass a finite latent")
            batch_z = None if z is None else jnp.broadcast_to(z, (len(ids), z.shape[-1]))
            out = generate(self.policy.lm, tokens, mask, sampling=sampling, seed=seed, z=batch_z)
        return [self.codec.decode(row, keep) for row, keep in zip(np.asarray(out.tokens), np.asarray(out.mask))]

    def log_prob(self, prompt: str, response: str, z: jax.Array | None = None) -> float:
        """log π(response | prompt, z) under the steered policy."""
        return float(self.policy.log_probs(self.options([prompt], [response]), None if z is None else z[None])[0])


def _trained_models(config: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """The policies a run trained: a steering run's configured models, an hh-dpo run's results (its
    oracles are one model per user type)."""
    return list(config["models"]) if results["experiment"] == "steering" else list(results.get("models", {}))


def _load_steering(run_dir: Path, results: dict[str, Any]):
    """A steering run's base (stored in the run), the language's codec, features from the base's states."""
    config = results["config"]
    base = from_pretrained(run_dir / "checkpoints" / BASE_DIR, tokenizer=False)

    def tokenize(prompts, responses, what):
        return [two_styles.option_tokens(p, r, f"{what}[{i}]") for i, (p, r) in enumerate(zip(prompts, responses))]

    def load_data() -> RunData:
        pairs = stored_pairs(run_dir)
        return RunData({split: OptionPairPool(pool, pairs.options) for split, pool in pairs.pools().items()},
                       pairs.identity)

    codec = two_styles.TwoStylesCodec(config_from_dict(two_styles.LanguageSpec, config["language"], "language"))
    return (base, codec, OptionEmbedder(base.model, tokenize), float(config["temperature"]),
            base_identity(base.weights_hash), load_data)


def _load_hh_dpo(run_dir: Path, results: dict[str, Any]):
    """An hh-dpo run's base and embedder (where its config names them, each checked against the run's
    record), the base's chat template as codec, and the prepared UltraFeedback pairs with their features."""
    from nps.data.embedding_cache import embed_options_cached, embedder_key, option_tokens
    from nps.data.prepared import BuildParameters, prepared_or_prepare
    from nps.data.ultrafeedback import option_pair_pool

    config, results_path = results["config"], run_dir / "results.json"
    dtype = jnp.dtype(config["dtype"])
    base = from_pretrained(config["model"], dtype=dtype)
    recorded = results["base"]
    if base.weights_hash != recorded["weights_hash"]:
        raise ConfigError(f"{results_path}: base.weights_hash is {recorded['weights_hash'][:16]}…, but the model at "
                          f"{config['model']} has {base.weights_hash[:16]}…; put the run's base model there")
    embedder_path = config["embedder"] or config["model"]
    embedder = base if embedder_path == config["model"] else from_pretrained(embedder_path, dtype=dtype)
    max_length = int(config["embed_max_length"])
    now = embedder_key(embedder, config["dtype"], max_length)
    for field, value in now.items():
        if results["embedder"].get(field) != value:
            raise ConfigError(f"{results_path}: embedder.{field} is {results['embedder'].get(field)!r}, but the "
                              f"embedder at {embedder_path} gives {value!r}; put the run's embedder there")

    def tokenize(prompts, responses, what):
        return option_tokens(embedder.tokenizer, list(prompts), list(responses), max_length).ids

    def load_data() -> RunData:
        build = BuildParameters("hh", config["conflict_rate"], config["split_by"], config["seed"])
        data = prepared_or_prepare(config["data"], run_dir / "dataset", build, echo=lambda _: None)
        if data.content_hash != results["data"]["content_hash"]:
            raise ConfigError(f"{results_path}: data.content_hash differs from the dataset at {data.directory}; "
                              "pass the data the run was trained on")
        features, _ = embed_options_cached(embedder, data.option_prompts(), data.options.responses,
                                           data.directory / "embeddings", dtype=config["dtype"], max_length=max_length,
                                           batch_size=config["embed_batch_size"], echo=lambda _: None)
        rows = len(features)
        # The encoder reads only the options' features; particles and scorers need no token rows.
        options = PolicyOptions(jnp.zeros((rows, 1), jnp.int32), jnp.ones((rows, 1), bool), jnp.zeros((rows, 1), bool),
                                jnp.asarray(features), jnp.full((rows,), jnp.nan, jnp.float32))
        return RunData({name: option_pair_pool(part, data.options.ratings, options)
                        for name, part in data.splits.items()}, results["data"])

    codec = ChatCodec(base.tokenizer, max_new_tokens=int(config["max_length"]))
    return (base, codec, OptionEmbedder(embedder.model, tokenize), HH_DPO_TEMPERATURE,
            {"path": recorded["path"], "weights_hash": base.weights_hash}, load_data)


def load_baseline(spec: str) -> tuple[str, SteeringRun | None]:
    """``--baseline``: "base" (the unconditioned base LM; None) or RUN_DIR[:MODEL] (another run's policy)."""
    if spec == "base":
        return "base", None
    run_dir, _, model = spec.partition(":")
    return spec, SteeringRun.load(run_dir, model or "np_dpo")
