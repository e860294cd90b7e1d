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

import numpy as np

from nps.errors import ConfigError

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


def conflicting(rewards_a: np.ndarray, rewards_b: np.ndarray) -> np.ndarray:
    """Pairs the two users strictly rank in opposite orders: [N] bool from rewards [N, 2]."""
    first = np.sign(rewards_a[:, 0] - rewards_b[:, 0])
    second = np.sign(rewards_a[:, 1] - rewards_b[:, 1])
    return (first != 0) & (second != 0) & (first != second)


def encode_words(text: str, field: str = "text") -> list[int]:
    """Token ids of whitespace-separated words of the language (an unknown word is an error)."""
    index = {w: i for i, w in enumerate(vocabulary())}
    unknown = [w for w in text.split() if w not in index]
    if unknown:
        raise ConfigError(
            f"{field}: {unknown[0]!r} is not a word of the steering language; use topics ({', '.join(TOPICS[:4])}, ...) "
            f"and words such as {', '.join(DETAILED[:3] + CAUTIOUS[:3] + NEUTRAL[:2])}"
        )
    return [index[w] for w in text.split()]


def option_tokens(prompt: str, response: str, field: str = "pair") -> list[int]:
    """<bos> prompt Assistant: response <eos>, as the policy and the encoder read options."""
    return [BOS, *encode_words(prompt, f"{field}.prompt"), SEP, *encode_words(response, f"{field}.response"), EOS]


def decode_response(ids) -> str:
    """Words up to (not including) <eos>."""
    words = vocabulary()
    out = []
    for token in ids:
        if token in (EOS, PAD):
            break
        out.append(words[token])
    return " ".join(out)
