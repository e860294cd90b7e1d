"""Frozen-LM embeddings of many options, computed once, stored as they finish, resumed after a kill.

The paper's option features are a frozen LLM's last-token hidden state of
"Human: {prompt}\\n\\nAssistant: {response}" (with real newlines; the released code wrote a
literal backslash-n), tokenised with the tokenizer's own special tokens (Llama 3's
``<|begin_of_text|>``, Gemma's ``<bos>``; Qwen2 adds none), as the released code did. An
option longer than the maximum length loses the start of its *prompt* (after "Human: "), so
its response, whose last token gives the feature, stays whole; only a response that alone
overflows is cut from the right. Both are counted (docs/design.md, UltraFeedback).

A cache folder holds ``manifest.json`` (the key: the model's weights hash, architecture and
dtype, the feature recipe, and a hash of the exact token sequences, so every
input that changes a feature, the maximum length included, is in it) and one
``chunk-NNNNN.npy`` per ``chunk_size`` options, each written atomically. Re-running skips the
chunks on disk, so a killed run loses at most one chunk; a cache made with another key is
refused with the fix, and one process at a time writes a cache (an exclusive lock).
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from nps.errors import ConfigError
from nps.files import Digest, atomic_write_bytes, atomic_write_json, exclusive_lock, texts_digest
from nps.lm.text import option_text

MANIFEST = "manifest.json"
# Names how a feature is computed from the token sequence; change it when that code changes.
FEATURE_RECIPE = "final normed hidden state of the last token; tokenizer's special tokens; prompt cut from the left"
PROMPT_START = option_text("\0", "").index("\0")  # where the prompt begins in the template ("Human: ")


@dataclasses.dataclass(frozen=True)
class OptionTokens:
    """Token ids of each option and how many had to be shortened to ``max_length`` tokens."""

    ids: list[list[int]]
    max_length: int
    prompts_cut: int  # lost the start of the prompt; the response is whole
    responses_cut: int  # the template and response alone overflow: the response lost its end


def option_tokens(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> OptionTokens:
    """``option_text`` of each pair as token ids with the tokenizer's special tokens, at most ``max_length``.

    An option that is too long keeps its leading special tokens and "Human: ", then drops prompt
    tokens from the left until it fits, so that its response stays whole; if even the template
    and the response overflow, the sequence is cut from the right (the response loses its end).
    """
    if max_length < 1:
        raise ConfigError(f"embed_max_length={max_length} must be at least 1")
    texts = [option_text(p, r) for p, r in zip(prompts, responses)]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    prompts_cut = responses_cut = 0
    if long:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"{len(long)} options exceed embed_max_length={max_length} tokens and cutting their "
                              "prompts needs a fast tokenizer (tokenizer.json beside the model); add one or raise "
                              "embed_max_length")
        encoded = tokenizer([texts[i] for i in long], add_special_tokens=True, return_offsets_mapping=True,
                            return_special_tokens_mask=True)
        for k, i in enumerate(long):
            ids[i], whole_response = _cut_prompt(encoded["input_ids"][k], encoded["offset_mapping"][k],
                                                 encoded["special_tokens_mask"][k], PROMPT_START,
                                                 PROMPT_START + len(prompts[i]), max_length)
            prompts_cut += whole_response
            responses_cut += not whole_response
    return OptionTokens([list(row) for row in ids], max_length, prompts_cut, responses_cut)


def _cut_prompt(ids, offsets, special, prompt_start: int, prompt_end: int, max_length: int) -> tuple[list, bool]:
    """``ids`` shortened to ``max_length`` by dropping prompt tokens (characters ``prompt_start`` to
    ``prompt_end`` of the text) from the left; True if the response stayed whole."""
    first_text = next((t for t in range(len(ids)) if not special[t]), len(ids))
    # The head: leading special tokens and every token that begins in "Human: ".
    head = first_text
    while head < len(ids) and not special[head] and offsets[head][0] < prompt_start:
        head += 1
    # The tail: from the first token that reaches past the prompt (the template's "\n\nAssistant: "
    # and the response), with any trailing special tokens.
    tail = head
    while tail < len(ids) and not special[tail] and offsets[tail][1] <= prompt_end:
        tail += 1
    kept = list(ids[:head]) + list(ids[tail:])
    if len(kept) <= max_length:
        drop = len(ids) - max_length
        return list(ids[:head]) + list(ids[head + drop:]), True
    return kept[:max_length], False


def _chunk_path(directory: Path, index: int) -> Path:
    return directory / f"chunk-{index:05d}.npy"


def tokens_digest(sequences: Sequence[Sequence[int]]) -> str:
    """BLAKE2b-128 over token sequences, each prefixed by its length."""
    digest = Digest()
    for ids in sequences:
        digest.framed(np.asarray(ids, np.int64).tobytes(), length=len(ids))
    return digest.hexdigest()


def cached_embeddings(
    sequences: Sequence[Sequence[int]],
    directory: str | Path,
    embed_fn: Callable[[Sequence[Sequence[int]]], np.ndarray],
    *,
    key: dict[str, Any],
    dim: int,
    chunk_size: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Embeddings [N, dim] (fp32) of token ``sequences``, computed chunk by chunk with ``embed_fn`` and cached.

    ``key``: what besides the sequences decides a feature (the model's weights hash, architecture,
    dtype, feature recipe); a cache whose manifest differs in any field is refused.
    ``progress(done_chunks, total_chunks)`` is called after each chunk.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {**key, "tokens_hash": tokens_digest(sequences), "num_texts": len(sequences), "dim": dim,
                "chunk_size": chunk_size}
    path = directory / MANIFEST
    with exclusive_lock(directory, f"the embedding cache {directory}"):
        if path.exists():
            try:
                saved = json.loads(path.read_bytes().decode("utf-8"))
            except ValueError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc}); delete this cache folder to embed again") from None
            for field, value in manifest.items():
                if not isinstance(saved, dict) or saved.get(field) != value:
                    raise ConfigError(
                        f"{path}: {field} is {saved.get(field) if isinstance(saved, dict) else None!r} but this run "
                        f"has {value!r}; these embeddings belong to another model or other texts: use another "
                        "folder or delete this one"
                    )
        else:
            atomic_write_json(path, manifest)
        chunks = -(-len(sequences) // chunk_size)
        for index in range(chunks):
            target = _chunk_path(directory, index)
            rows = min(chunk_size, len(sequences) - index * chunk_size)
            if target.exists() and _readable_chunk(target, (rows, dim)):
                continue
            vectors = np.asarray(embed_fn(sequences[index * chunk_size : index * chunk_size + rows]), np.float32)
            if vectors.shape != (rows, dim):
                raise ConfigError(f"the embedding function returned shape {vectors.shape}, expected {(rows, dim)}")
            buffer = io.BytesIO()
            np.save(buffer, vectors, allow_pickle=False)
            atomic_write_bytes(target, buffer.getvalue())
            if progress is not None:
                progress(index + 1, chunks)
        if not chunks:
            return np.zeros((0, dim), np.float32)
        return np.concatenate([np.load(_chunk_path(directory, i), allow_pickle=False) for i in range(chunks)])


def _readable_chunk(path: Path, shape: tuple[int, int]) -> bool:
    """A finished chunk of this shape; a damaged one is embedded again."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).shape == shape
    except (OSError, ValueError):
        return False


def embed_options_cached(
    model: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    directory: str | Path,
    *,
    dtype: str = "bfloat16",
    max_length: int = 1024,
    batch_size: int = 16,
    echo: Callable[[str], None] = print,
) -> tuple[np.ndarray, dict]:
    """The paper's option features: ``model``'s last-token state of each option's tokens, cached.
    ``model``: a model folder or hub id, loaded in ``dtype``, or a model loaded so (``nps.lm.Pretrained``).

    The cache lives in ``directory/<model folder name>-<dtype>-len<max_length>`` (a run with another
    model or maximum length gets its own folder; one with the same name but other weights, tokenizer
    or architecture is refused by the manifest). Returns features [M, D] and a record of the embedder:
    identity, weights hash, dimension, the maximum length and how many options were cut to it, and
    the throughput of this call.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nps.layers import BaseParam
    from nps.lm import embed_tokens, from_pretrained

    embedder = from_pretrained(model, dtype=jnp.dtype(dtype)) if isinstance(model, (str, Path)) else model
    weights_dtype = jax.tree.leaves(nnx.state(embedder.model, BaseParam))[0].dtype
    if weights_dtype != jnp.dtype(dtype):  # the cache's key says dtype: a model loaded otherwise would lie to it
        raise ConfigError(f"{embedder.identity}: the embedder was loaded in {weights_dtype}, not dtype={dtype}; "
                          f"load it with dtype={dtype} or pass that dtype")
    tokens = option_tokens(embedder.tokenizer, prompts, responses, max_length)
    if tokens.prompts_cut or tokens.responses_cut:
        echo(f"embedding: {tokens.prompts_cut} options had the start of their prompt cut to fit {max_length} tokens, "
             f"{tokens.responses_cut} the end of their response (embed_max_length)")
    folder = Path(directory) / f"{Path(embedder.identity.rstrip('/')).name}-{dtype}-len{max_length}"
    key = embedder_key(embedder, dtype, max_length)
    computed = []

    def embed_chunk(chunk):
        computed.append(len(chunk))
        return embed_tokens(embedder.model, chunk, batch_size=batch_size)

    start = time.perf_counter()
    features = cached_embeddings(
        tokens.ids, folder, embed_chunk, key=key, dim=embedder.config.hidden_size,
        progress=lambda done, total: echo(f"embedded chunk {done}/{total} into {folder}"),
    )
    seconds = time.perf_counter() - start
    record = {
        "model": embedder.identity, **key, "dim": embedder.config.hidden_size, "num_options": len(tokens.ids),
        "prompts_cut": tokens.prompts_cut, "responses_cut": tokens.responses_cut, "cache": str(folder),
        "embedded_now": sum(computed),
        "options_per_second": sum(computed) / seconds if computed else None,
    }
    return features, record


def embedder_key(embedder, dtype: str, max_length: int) -> dict[str, Any]:
    """What makes a loaded embedder's (``nps.lm.Pretrained``) option features what they are: its weights, dtype,
    architecture, the recipe and the maximum length; not the model's path (a moved folder computes the same)."""
    architecture = texts_digest([json.dumps(dataclasses.asdict(embedder.config), sort_keys=True, default=str)])
    return {"weights_hash": embedder.weights_hash, "dtype": dtype, "architecture": architecture,
            "features": FEATURE_RECIPE, "max_length": max_length}


def embedder_identity(record: dict) -> dict:
    """The parts of an ``embed_options_cached`` record that identify the features (not this call's timing)."""
    return {key: record[key] for key in ("model", "weights_hash", "dtype", "architecture", "features", "dim",
                                         "max_length")}
