"""A small language with two answer styles and two users who disagree about them.

The steering experiment's ground truth (``nps reproduce steering``). Prompts are
"<bos> topic topic Assistant:"; a response is a run of words, each *detailed*
("example", "step", ...; the helpfulness-like style), *cautious* ("perhaps",
"caveat", ...; the honesty-like style) or neutral, then "<eos>". A response's style
mix p (the chance a styled word is detailed) varies per response, and detailed
answers run longer, so a language model trained on the corpus must infer p from the
prefix to predict the next word, and can produce either behaviour.

Two simulated users score responses programmatically: the *detail* user by the
number of detailed words, the *caution* user by the number of cautious words. Pairs
sampled from the base model are kept only when the users strictly disagree (the
UltraFeedback HH setting with conflict rate 1.0), so a policy that ignores who it
serves gets half of them wrong.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from nps.data.pairs import PairPool, PolicyOptions, choices, conflicting, split_indices, untied
from nps.errors import ConfigError
from nps.files import atomic_write_bytes
from nps.lm.generate import SamplingConfig, embed_tokens, generate

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "Assistant:"]
TOPICS = [
    "physics", "cooking", "history", "music", "gardening", "finance", "travel", "chess",
    "poetry", "biology", "football", "coding", "painting", "weather", "medicine", "law",
]
DETAILED = ["example", "step", "detail", "further", "specifically", "because", "first", "then", "finally", "also"]
CAUTIOUS = ["perhaps", "unsure", "caveat", "possibly", "might", "uncertain", "roughly", "unclear", "verify", "likely"]
NEUTRAL = ["the", "and", "it", "is", "this", "so"]
USER_NAMES = ("detail", "caution")


def vocabulary() -> list[str]:
    """Every token, by id: specials, topics, detailed, cautious, neutral words."""
    return SPECIAL_TOKENS + TOPICS + DETAILED + CAUTIOUS + NEUTRAL


def word_ids(words: list[str]) -> np.ndarray:
    index = {w: i for i, w in enumerate(vocabulary())}
    return np.asarray([index[w] for w in words], np.int32)


DETAILED_IDS = word_ids(DETAILED)
CAUTIOUS_IDS = word_ids(CAUTIOUS)
NEUTRAL_IDS = word_ids(NEUTRAL)
TOPIC_IDS = word_ids(TOPICS)
PROMPT_LENGTH = 4  # <bos> topic topic Assistant:


@dataclasses.dataclass(frozen=True)
class LanguageSpec:
    """Corpus statistics. A response has min_words + round(extra_words · p) words, p ~ U(0, 1)."""

    min_words: int = 4
    extra_words: int = 6
    neutral_rate: float = 0.2

    @property
    def max_response(self) -> int:
        """Longest response in tokens (words + <eos>)."""
        return self.min_words + self.extra_words + 1

    @property
    def sequence_length(self) -> int:
        return PROMPT_LENGTH + self.max_response


def sample_prompts(rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, PROMPT_LENGTH] prompts: <bos> topic topic Assistant:."""
    topics = rng.choice(TOPIC_IDS, size=(count, 2))
    return np.concatenate(
        [np.full((count, 1), BOS), topics, np.full((count, 1), SEP)], axis=1
    ).astype(np.int32)


def sample_corpus(rng: np.random.Generator, count: int, spec: LanguageSpec) -> tuple[np.ndarray, np.ndarray]:
    """Pretraining sequences [count, L] (prompt, response, <eos>, padding) and their masks."""
    style = rng.uniform(size=count)
    lengths = spec.min_words + np.rint(spec.extra_words * style).astype(int)
    tokens = np.full((count, spec.sequence_length), PAD, np.int32)
    tokens[:, :PROMPT_LENGTH] = sample_prompts(rng, count)
    for row in range(count):
        neutral = rng.uniform(size=lengths[row]) < spec.neutral_rate
        detailed = rng.uniform(size=lengths[row]) < style[row]
        words = np.where(
            neutral,
            rng.choice(NEUTRAL_IDS, lengths[row]),
            np.where(detailed, rng.choice(DETAILED_IDS, lengths[row]), rng.choice(CAUTIOUS_IDS, lengths[row])),
        )
        end = PROMPT_LENGTH + lengths[row]
        tokens[row, PROMPT_LENGTH:end] = words
        tokens[row, end] = EOS
    return tokens, tokens != PAD


def style_counts(responses: np.ndarray) -> np.ndarray:
    """[..., 2] numbers of detailed and cautious words in responses [..., R] (up to <eos>)."""
    before_eos = np.cumsum(responses == EOS, axis=-1) == 0
    detailed = np.sum(np.isin(responses, DETAILED_IDS) & before_eos, axis=-1)
    cautious = np.sum(np.isin(responses, CAUTIOUS_IDS) & before_eos, axis=-1)
    return np.stack([detailed, cautious], axis=-1)


def user_rewards(responses: np.ndarray) -> np.ndarray:
    """[..., 2] each user's true reward: the count of the words of the style they prefer."""
    return style_counts(responses).astype(np.float32)


def detail_share(responses: np.ndarray) -> np.ndarray:
    """Detailed words / styled words per response (0.5 when it has none): the behaviour we steer."""
    counts = style_counts(responses)
    total = counts.sum(axis=-1)
    return np.where(total > 0, counts[..., 0] / np.maximum(total, 1), 0.5)


def encode_words(text: str, field: str = "text") -> list[int]:
    """Token ids of whitespace-separated words of the language (an unknown word is an error)."""
    index = {w: i for i, w in enumerate(vocabulary())}
    unknown = [w for w in text.split() if w not in index]
    if unknown:
        raise ConfigError(
            f"{field}: {unknown[0]!r} is not a word of the steering language; "
            f"use topics ({', '.join(TOPICS[:4])}, ...) "
            f"and words such as {', '.join(DETAILED[:3] + CAUTIOUS[:3] + NEUTRAL[:2])}"
        )
    return [index[w] for w in text.split()]


def option_tokens(prompt: str, response: str, field: str = "pair") -> list[int]:
    """<bos> prompt Assistant: response <eos>, as the policy and the encoder read options."""
    return [BOS, *encode_words(prompt, f"{field}.prompt"), SEP, *encode_words(response, f"{field}.response"), EOS]


def response_tokens(responses: Sequence[str], spec: LanguageSpec = LanguageSpec()) -> np.ndarray:
    """Responses as token rows [N, max_response + 1] (words, <eos>, padding): what the rewards read."""
    rows = np.full((len(responses), spec.max_response + 1), PAD, np.int64)
    for row, response in enumerate(responses):
        words = encode_words(response, f"responses[{row}]")[: spec.max_response] + [EOS]
        rows[row, : len(words)] = words
    return rows


def decode_response(ids) -> str:
    """Words up to (not including) <eos>."""
    words = vocabulary()
    out = []
    for token in ids:
        if token in (EOS, PAD):
            break
        out.append(words[token])
    return " ".join(out)


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the language's vocabulary, so the base works with text tools."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.save_pretrained(str(directory))


# -- preference pairs sampled from a base model ---------------------------------------------------
def sampling(spec: LanguageSpec, temperature: float) -> SamplingConfig:
    """How responses of the language are sampled: up to its longest response, stopping at <eos>."""
    return SamplingConfig(max_new_tokens=spec.max_response, temperature=temperature, stop_tokens=(EOS,),
                          pad_token=PAD)


MAX_PROMPT_WORDS = 6  # a served prompt: a few topics


@dataclasses.dataclass(frozen=True)
class TwoStylesCodec:
    """The language as a trained run's text codec (``nps.steering_run``): "<bos> prompt Assistant:"
    prompts, options as ``option_tokens``, responses up to <eos>; and the users' true rewards (an oracle
    scorer only this toy language has)."""

    spec: LanguageSpec
    pad = PAD
    free_text = False  # prompts are words of the language (the app's Try page says so)

    def check_prompt(self, prompt: str, what: str = "prompt") -> str:
        """The prompt as served (words joined by one space); one of more than ``MAX_PROMPT_WORDS`` words, or a
        word outside the language, is a ``ConfigError``."""
        words = prompt.split()
        if not words or len(words) > MAX_PROMPT_WORDS:
            raise ConfigError(f"a prompt has 1 to {MAX_PROMPT_WORDS} words of the steering language "
                              f"(e.g. {' '.join(TOPICS[:2])!r}); got {len(words)}")
        encode_words(prompt, what)
        return " ".join(words)

    def prompt_ids(self, prompt: str, what: str = "prompt") -> list[int]:
        return [BOS, *encode_words(prompt, what), SEP]

    def option_ids(self, prompt: str, response: str, what: str = "pair") -> tuple[list[int], int]:
        """``option_tokens`` and where the response starts (after <bos> prompt Assistant:)."""
        return option_tokens(prompt, response, what), len(encode_words(prompt)) + 2

    def decode(self, tokens: Sequence[int], mask: Sequence[bool]) -> str:
        return decode_response(tokens)

    def sampling(self, temperature: float) -> SamplingConfig:
        return sampling(self.spec, temperature)

    def example_prompts(self, candidates: list[dict[str, Any]]) -> list[str]:
        """The topics a prompt is made of."""
        return list(TOPICS)

    @staticmethod
    def user_reward(responses: list[str], user_type: str) -> np.ndarray:
        """The true reward [N] of ``user_type`` (one of ``USER_NAMES``) for each response."""
        return user_rewards(response_tokens(responses))[:, USER_NAMES.index(user_type)]


def sample_responses(model, prompts: np.ndarray, spec: LanguageSpec, temperature: float, seed: int,
                     z=None) -> np.ndarray:
    """Responses [N, R] (<eos> then padding) of ``model`` (a decoder, or a conditioned one with z [N, d])."""
    return np.asarray(generate(model, prompts, sampling=sampling(spec, temperature), seed=seed, z=z).tokens)


class PreferencePairs(NamedTuple):
    """Pairs of a base model's responses that neither user ties, as a steering run stores them: the
    file form of its data (``save``/``load``), which ``pools()`` turns into ``PairPool``s of row ids
    (each user's reward as its utility) to use over ``options`` as ``OptionPairPool``s.

    options: ``PolicyOptions`` of 2N rows, the first responses of the N pairs then the second ones.
    rewards: [2N, 2] each user's reward of each row. conflicting: [N] True where the users rank the
    pair oppositely. splits: pair ids per split, ``{"conflicting": {train, val, test}, "all": {...}}``
    (80/10/10 of the conflicting pairs, the training data; and of all pairs, as sampling produces
    them). identity: what checkpoints and results record about the conflicting pairs.
    """

    options: PolicyOptions
    rewards: np.ndarray
    conflicting: np.ndarray
    splits: dict[str, dict[str, np.ndarray]]
    identity: dict[str, Any]

    @property
    def num_pairs(self) -> int:
        return len(self.conflicting)

    def pools(self, which: str = "conflicting") -> dict[str, PairPool]:
        """Train / val / test ``PairPool``s of row ids into ``options`` (use with ``OptionPairPool``)."""
        pools = {}
        for split, ids in self.splits[which].items():
            pools[split] = PairPool(
                option_a=jnp.asarray(ids[:, None], jnp.int32),
                option_b=jnp.asarray(ids[:, None] + self.num_pairs, jnp.int32),
                utility_a=jnp.asarray(self.rewards[ids]),
                utility_b=jnp.asarray(self.rewards[ids + self.num_pairs]),
            )
        return pools

    def save(self, path: str | Path) -> Path:
        """One .npz (no pickle), written atomically."""
        arrays = {f"options_{name}": np.asarray(value) for name, value in self.options._asdict().items()}
        arrays |= {"rewards": self.rewards, "conflicting": self.conflicting,
                   "identity": np.asarray(json.dumps(self.identity))}
        arrays |= {f"split_{which}_{split}": ids
                   for which, parts in self.splits.items() for split, ids in parts.items()}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> PreferencePairs:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        options = PolicyOptions(**{name: jnp.asarray(arrays[f"options_{name}"]) for name in PolicyOptions._fields})
        splits: dict[str, dict[str, np.ndarray]] = {}
        for name, ids in arrays.items():
            if name.startswith("split_"):
                which, split = name.removeprefix("split_").rsplit("_", 1)
                splits.setdefault(which, {})[split] = ids
        return cls(options, arrays["rewards"], arrays["conflicting"], splits, json.loads(str(arrays["identity"])))


def sample_preference_pairs(base, spec: LanguageSpec, num_prompts: int, temperature: float, seed: int,
                            min_conflicting: int = 50) -> PreferencePairs:
    """Two responses of ``base`` per prompt, labelled by both users, with option features (the base's
    last-token states) and reference log-probabilities still to fill (NaN; see
    ``nps.models.with_reference_log_probs``). Pairs either user ties are dropped."""
    rng = np.random.default_rng(seed + 1)
    prompts = sample_prompts(rng, num_prompts)
    first = sample_responses(base, prompts, spec, temperature, seed + 2)
    second = sample_responses(base, prompts, spec, temperature, seed + 3)
    rewards_a, rewards_b = user_rewards(first), user_rewards(second)
    choice = choices(rewards_a, rewards_b)
    kept, conflict = untied(choice), conflicting(choice)
    count = int(conflict.sum())
    if count < min_conflicting:
        raise ConfigError(f"num_prompts={num_prompts} gives only {count} conflicting pairs; raise num_prompts")
    splits = {"conflicting": {k: np.flatnonzero(conflict[kept])[v] for k, v in
                              split_indices(rng.permutation(count)).items()},
              "all": split_indices(rng.permutation(int(kept.sum())))}
    sequences = np.concatenate([np.concatenate([prompts, first], 1)[kept],
                                np.concatenate([prompts, second], 1)[kept]])
    is_eos = sequences == EOS
    token_mask = ((np.cumsum(is_eos, axis=1) - is_eos) == 0) & (sequences != PAD)
    response_mask = token_mask & (np.arange(sequences.shape[1]) >= PROMPT_LENGTH)
    features = embed_tokens(base, [row[m] for row, m in zip(sequences, token_mask)], batch_size=512)
    options = PolicyOptions(
        tokens=jnp.asarray(sequences), token_mask=jnp.asarray(token_mask), response_mask=jnp.asarray(response_mask),
        features=jnp.asarray(features), reference_log_prob=jnp.full((len(sequences),), jnp.nan, jnp.float32),
    )
    identity = {
        "name": "steering-two-styles", "seed": seed, "num_prompts": num_prompts,
        "conflicting_pairs": count, "conflict_share_of_sampled_pairs": count / num_prompts,
        "split_sizes": {k: len(v) for k, v in splits["conflicting"].items()},
    }
    rewards = np.concatenate([rewards_a[kept], rewards_b[kept]])
    return PreferencePairs(options, rewards, conflict[kept], splits, identity)
