"""Batched, jit-compiled generation with a KV cache, and last-token text embeddings.

``generate`` runs the whole decode loop inside one compiled ``lax.while_loop``
(prefill, then one token per step into a preallocated cache), so Python is not
in the loop; it stops early once every sequence has produced a stop token.
Prompts are left-aligned (padding first) so that every sequence writes its next
token into the same cache slot.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.errors import ConfigError
from nps.lm.decoder import KVCache
from nps.lm.sharding import constrain, mesh_of, on_mesh


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: tuple[int, ...] = ()
    pad_token: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):  # NaN and inf fail `< 0` checks
            raise ConfigError(f"temperature={self.temperature} must be a finite number >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 is off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 is off)")


class Generation(NamedTuple):
    """tokens [B, N] (pad after the end), mask [B, N] of generated tokens, lengths [B]."""

    tokens: jax.Array
    mask: jax.Array
    lengths: jax.Array


def sample_next(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next tokens [B] from logits [B, V] under ``sampling``."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / sampling.temperature
    floor = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, floor, logits)
    if sampling.top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < nucleus_threshold(probs, sampling.top_p), floor, logits)
    return jax.random.categorical(key, logits, axis=-1)


def nucleus_threshold(probs: jax.Array, top_p: float) -> jax.Array:
    """The smallest kept probability [B, 1] of top-p (nucleus) sampling, found without sorting.

    Sorted descending, a token is kept iff the mass strictly above it is < top_p. That
    mass is non-increasing in the threshold, so the threshold is found by bisection
    over the (order-preserving) int32 bit patterns of non-negative float32 values:
    31 masked sums over the vocabulary, exact, and much cheaper on CPU than a sort.
    """

    def mass_above(bits):
        threshold = jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs > threshold, probs, 0.0), axis=-1)

    def halve(_, bounds):
        low, high = bounds  # invariant: mass_above(low) >= top_p > mass_above(high)
        mid = low + (high - low) // 2
        keep_low = mass_above(jnp.maximum(mid, 0)) >= top_p
        return jnp.where(keep_low, mid, low), jnp.where(keep_low, high, mid)

    high = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32)
    low = jnp.full_like(high, -1)  # "below zero": everything is above it
    _, high = jax.lax.fori_loop(0, 31, halve, (low, high))
    return jax.lax.bitcast_convert_type(high, jnp.float32)[:, None]


def pad_sequences(sequences: Sequence[Sequence[int]], *, left: bool, pad: int = 0,
                  width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of different lengths as one batch: tokens [N, width] and the mask of real tokens.

    ``left``: padding before the tokens (prompts to continue); else after (sequences to score).
    ``width``: at least the longest row (None: the longest).
    """
    width = max(max((len(s) for s in sequences), default=1), width or 0)
    tokens = np.full((len(sequences), width), pad, np.int32)
    mask = np.zeros((len(sequences), width), bool)
    for row, sequence in enumerate(sequences):
        span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
        tokens[row, span], mask[row, span] = sequence, True
    return tokens, mask


def left_align(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's real tokens to the end (padding first), keeping their order."""
    mask = np.asarray(mask, bool)
    order = np.argsort(mask, axis=1, kind="stable")  # False (padding) first
    return np.take_along_axis(np.asarray(tokens), order, 1), np.take_along_axis(mask, order, 1)


def generate(
    model,
    prompt_tokens,
    prompt_mask=None,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int | jax.Array = 0,
    z: jax.Array | None = None,
) -> Generation:
    """Continue prompts [B, P] (any padding) by up to ``sampling.max_new_tokens`` tokens.

    model: a ``Decoder`` or a ``ConditionedDecoder`` (then z [B, d_z] steers each
    example; z = None generates from the base). seed: an int or a PRNG key for the whole batch, or
    PRNG keys [B], one per sequence: then a sequence samples the same tokens whatever batch it is in
    (what a server that batches concurrent requests needs).
    """
    prompt_tokens = np.asarray(prompt_tokens)
    if prompt_mask is None:
        prompt_mask = np.ones(prompt_tokens.shape, bool)
    tokens, mask = left_align(prompt_tokens, prompt_mask)
    if not mask[:, -1].all():
        raise ConfigError("every prompt needs at least one token (a row of prompt_mask is all False)")
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), key, z, sampling, mesh_of(state))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "mesh"))
def _generate(graphdef, state, tokens, mask, key, z, sampling: SamplingConfig, mesh=None) -> Generation:
    """The decode loop of ``generate``; on the ``mesh`` the weights live on, each device holds its
    sequences' cache (and its key-value heads under tensor parallelism)."""
    with on_mesh(mesh):
        generation = _decode(nnx.merge(graphdef, state), tokens, mask, key, z, sampling)
        return jax.tree.map(_whole, generation)


def _whole(x: jax.Array) -> jax.Array:
    """A program's (small) result on every device, so that every process of a run can read it."""
    return constrain(x, (None,) * x.ndim)


def _sample(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Next tokens [B] and the key to carry on: one key for the batch, or one per row (keys [B])."""
    if key.ndim == 0:
        key, sample_key = jax.random.split(key)
        return sample_next(logits, sample_key, sampling), key
    keys = jax.vmap(jax.random.split)(key)
    row = lambda k, x: sample_next(x[None], k, sampling)[0]  # noqa: E731
    return jax.vmap(row)(keys[:, 1], logits), keys[:, 0]


def _decode(model, tokens, mask, key, z, sampling: SamplingConfig) -> Generation:
    decoder = getattr(model, "decoder", model)
    film = model.modulation(z) if z is not None else None
    tokens, mask = (constrain(x, ("activation_batch", "activation_length")) for x in (tokens, mask))
    batch, prompt_len = tokens.shape
    steps = sampling.max_new_tokens
    cache = KVCache.empty(decoder.config, batch, prompt_len + steps, decoder.dtype)
    hidden, cache = decoder.hidden_states(tokens, mask, film=film, cache=cache, cache_index=0)
    logits = decoder.logits(hidden[:, -1])
    stop = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)

    def cond(carry):
        step, _, _, _, _, done = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, key, out, done = carry
        sampled, key = _sample(logits, key, sampling)
        token = jnp.where(done, sampling.pad_token, sampled).astype(jnp.int32)
        out = out.at[:, step].set(token)
        live = ~done
        done = done | jnp.isin(token, stop)
        hidden, cache = decoder.hidden_states(
            token[:, None], live[:, None], film=film, cache=cache, cache_index=prompt_len + step
        )
        return step + 1, cache, decoder.logits(hidden[:, -1]), key, out, done

    out = jnp.full((batch, steps), sampling.pad_token, jnp.int32)
    done = jnp.zeros((batch,), bool)
    carry = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, logits, key, out, done))
    out = carry[4]
    # A token is generated if no stop token came strictly before it.
    is_stop = jnp.isin(out, stop)
    generated = (jnp.cumsum(is_stop, axis=1) - is_stop) == 0
    generated = generated & (jnp.arange(steps) < carry[0])
    return Generation(out, generated, jnp.sum(generated, axis=1))


def generate_text(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    chat: bool = True,
    sampling: SamplingConfig | None = None,
    seed: int | jax.Array = 0,
    z: jax.Array | None = None,
) -> list[str]:
    """Generate a reply to each prompt; ``chat`` wraps it as a user turn with the tokenizer's chat template.

    Stops at the tokenizer's EOS token (and any ``sampling.stop_tokens``); the replies are
    decoded without special tokens.
    """
    if chat:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
    # Tokenised unpadded (Llama 3's tokenizer has no pad token) and padded here; generate left-aligns.
    tokens, mask = pad_sequences(tokenizer(list(prompts), add_special_tokens=not chat)["input_ids"], left=True)
    sampling = sampling or SamplingConfig()
    stops = set(sampling.stop_tokens)
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sampling.pad_token
    sampling = dataclasses.replace(sampling, stop_tokens=tuple(sorted(stops)), pad_token=int(pad))
    out = generate(model, tokens, mask, sampling=sampling, seed=seed, z=z)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(tokens, mask)]


def embed(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
) -> np.ndarray:
    """Last-token final hidden states [N, D] (fp32) of ``texts``: the paper's option features.

    Texts are tokenised as is (no template), truncated to ``max_length`` tokens,
    sorted by length and right-padded to power-of-two buckets (few compilations,
    little padding), then returned in the input order.
    """
    if max_length < 1:
        raise ConfigError(f"max_length={max_length} must be at least 1")
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        empty = next(i for i, ids in enumerate(encoded) if len(ids) == 0)
        raise ConfigError(f"texts[{empty}] is empty after tokenisation; embed needs at least one token")
    return embed_tokens(model, encoded, batch_size=batch_size)


def embed_tokens(model, sequences: Sequence[Sequence[int]], *, batch_size: int = 16) -> np.ndarray:
    """Last-token final hidden states [N, D] (fp32) of token sequences of any lengths (≥ 1)."""
    graphdef, state = nnx.split(model)
    order = np.argsort([len(ids) for ids in sequences], kind="stable")
    out = np.zeros((len(sequences), model.config.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = max(len(sequences[i]) for i in rows)
        width = max(16, 1 << (longest - 1).bit_length())
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), bool)
        for row, i in enumerate(rows):
            tokens[row, : len(sequences[i])] = sequences[i]
            mask[row, : len(sequences[i])] = True
        mask[len(rows) :, 0] = True  # filler rows: one token, discarded
        vectors = _last_token_states(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), mesh_of(state))
        out[rows] = np.asarray(vectors[: len(rows)], np.float32)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _last_token_states(graphdef, state, tokens, mask, mesh=None):
    """Last-token final hidden states [B, D] (fp32) of tokens [B, T], each device its sequences."""
    with on_mesh(mesh):
        tokens, mask = (constrain(x, ("activation_batch", "activation_length")) for x in (tokens, mask))
        hidden, _ = nnx.merge(graphdef, state).hidden_states(tokens, mask)
        last = jnp.sum(mask, axis=1) - 1
        return _whole(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32))
