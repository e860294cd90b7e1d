"""Frozen-LM embeddings of many texts, computed once, stored as they finish, resumed after a kill.

The paper's option features are a frozen LLM's last-token hidden state of
"Human: {prompt}\\n\\nAssistant: {response}" (with real newlines; the released code wrote a
literal backslash-n). A cache folder holds ``manifest.json`` (the model's identity and
weights hash, a hash of the texts, the sizes) and one ``chunk-NNNNN.npy`` per
``chunk_size`` texts, each written atomically. Re-running skips the chunks on disk, so a
killed run loses at most one chunk; a cache made by another model or for other texts
is refused with the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nps.errors import ConfigError
from nps.files import texts_digest
from nps.lm.text import option_text

MANIFEST = "manifest.json"


def _chunk_path(directory: Path, index: int) -> Path:
    return directory / f"chunk-{index:05d}.npy"


def cached_embeddings(
    texts: Sequence[str],
    directory: str | Path,
    embed_fn: Callable[[Sequence[str]], np.ndarray],
    *,
    model_identity: str,
    weights_hash: str,
    dim: int,
    chunk_size: int = 1024,
    lengths: Sequence[int] | None = None,
    max_length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Embeddings [N, dim] (fp32) of ``texts``, computed chunk by chunk with ``embed_fn`` and cached.

    ``lengths`` (token counts) with ``max_length`` record how many texts were truncated.
    ``progress(done_chunks, total_chunks)`` is called after each chunk.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "model": model_identity,
        "weights_hash": weights_hash,
        "texts_hash": texts_digest(texts),
        "num_texts": len(texts),
        "dim": dim,
        "chunk_size": chunk_size,
        "max_length": max_length,
        "truncated": None if lengths is None or max_length is None else int(np.sum(np.asarray(lengths) > max_length)),
    }
    path = directory / MANIFEST
    if path.exists():
        saved = json.loads(path.read_text())
        for field in ("weights_hash", "texts_hash", "num_texts", "dim", "chunk_size"):
            if saved.get(field) != manifest[field]:
                raise ConfigError(
                    f"{path}: {field} is {saved.get(field)!r} but this run has {manifest[field]!r}; "
                    "these embeddings belong to another model or other texts: use another folder or delete this one"
                )
    else:
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path)
    chunks = -(-len(texts) // chunk_size)
    for index in range(chunks):
        target = _chunk_path(directory, index)
        rows = min(chunk_size, len(texts) - index * chunk_size)
        if target.exists() and np.load(target, mmap_mode="r").shape == (rows, dim):
            continue
        vectors = np.asarray(embed_fn(texts[index * chunk_size : index * chunk_size + rows]), np.float32)
        if vectors.shape != (rows, dim):
            raise ConfigError(f"the embedding function returned shape {vectors.shape}, expected {(rows, dim)}")
        tmp = target.with_suffix(".partial.npy")
        np.save(tmp, vectors)
        os.replace(tmp, target)
        if progress is not None:
            progress(index + 1, chunks)
    if not chunks:
        return np.zeros((0, dim), np.float32)
    return np.concatenate([np.load(_chunk_path(directory, i)) for i in range(chunks)])


def embed_options_cached(
    model: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    directory: str | Path,
    *,
    dtype: str = "bfloat16",
    max_length: int = 1024,
    batch_size: int = 16,
    echo: Callable[[str], None] = print,
) -> tuple[np.ndarray, dict]:
    """The paper's option features: ``model``'s last-token state of each ``option_text``, cached.

    The cache lives in ``directory/<model folder name>-<dtype>`` (a run with another model gets
    its own folder; one with the same name but other weights is refused by the manifest).
    Returns features [M, D] and a record of the embedder: identity, weights hash, dimension,
    how many options were truncated to ``max_length`` tokens, and the throughput of this call.
    """
    import time

    import jax.numpy as jnp

    from nps.lm import embed, from_pretrained

    texts = [option_text(p, r) for p, r in zip(prompts, responses)]
    embedder = from_pretrained(model, dtype=jnp.dtype(dtype))
    lengths = [len(ids) for ids in embedder.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    folder = Path(directory) / f"{Path(str(model).rstrip('/')).name}-{dtype}"
    computed = []

    def embed_chunk(chunk):
        computed.append(len(chunk))
        return embed(embedder.model, embedder.tokenizer, chunk, batch_size=batch_size, max_length=max_length)

    start = time.perf_counter()
    features = cached_embeddings(
        texts, folder, embed_chunk, model_identity=embedder.identity, weights_hash=embedder.weights_hash,
        dim=embedder.config.hidden_size, lengths=lengths, max_length=max_length,
        progress=lambda done, total: echo(f"embedded chunk {done}/{total} into {folder}"),
    )
    seconds = time.perf_counter() - start
    record = {
        "model": embedder.identity, "weights_hash": embedder.weights_hash, "dtype": dtype,
        "dim": embedder.config.hidden_size, "num_options": len(texts), "max_length": max_length,
        "truncated": int(np.sum(np.asarray(lengths) > max_length)), "cache": str(folder),
        "embedded_now": sum(computed),
        "options_per_second": sum(computed) / seconds if computed else None,
    }
    return features, record


def embedder_identity(record: dict) -> dict:
    """The parts of an ``embed_options_cached`` record that identify the features (not this call's timing)."""
    return {key: record[key] for key in ("model", "weights_hash", "dtype", "dim", "max_length")}
