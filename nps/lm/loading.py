"""Load Hugging Face decoder checkpoints (config.json + safetensors + tokenizer) into ``Decoder``.

Weights stream tensor by tensor from the files into their final dtype and sharding:
each tensor is read with ``pread`` into one host buffer, cast, placed on the devices,
and freed before the next, and per-block tensors are written into their preallocated
stacked array in place (a donated update). Host memory therefore peaks at the model
plus one tensor, never two copies of the model; no file is memory-mapped (mapped pages
would count against the process too). The safetensors header is parsed here, so a
truncated or malformed file is reported by name before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nps.errors import NPSError
from nps.layers import BaseParam
from nps.lm.decoder import Decoder, DecoderConfig, LoRAConfig, hf_name
from nps.lm.sharding import param_sharding

SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointFormatError(NPSError):
    """A model directory is missing a file, or a file does not hold what it should."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header and check every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(f"{path}: too short to be a safetensors file (truncated download?)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > size - 8:
            raise CheckpointFormatError(f"{path}: header length {header_len} exceeds the file (truncated?)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise CheckpointFormatError(f"{path}: header is not valid JSON ({exc}); re-download the file") from exc
    tensors = {}
    data_start = 8 + header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}; supported: {', '.join(SAFETENSORS_DTYPES)}"
            )
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointFormatError(f"{path}: tensor {name!r} byte range does not match its shape {shape}")
        if data_start + end > size:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} (truncated?)"
            )
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
    return tensors


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
    """One tensor (or rows [start, stop) of its first axis) as a fresh host array (no memory map)."""
    start, stop = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
    row_bytes = (info.stop - info.start) // max(info.shape[0], 1) if info.shape else info.stop - info.start
    buffer = np.empty((stop - start, *info.shape[1:]) if info.shape else (), info.dtype)
    view = memoryview(buffer.reshape(-1).view(np.uint8))
    offset = info.start + start * row_bytes
    with open(info.file, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            got = os.preadv(f.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise CheckpointFormatError(f"{info.file}: unexpected end of file while reading (truncated?)")
            done += got
    return buffer


def checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a single-file or sharded (index.json) safetensors checkpoint."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointFormatError(f"{index}: not a safetensors index (no 'weight_map'); re-download it") from exc
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in directory.glob("*.safetensors")) or ["none"]
        raise CheckpointFormatError(
            f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors files found: {', '.join(found)}); "
            "nps reads safetensors only (convert .bin/pickle checkpoints with transformers' save_pretrained)"
        )
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        path = directory / name
        if not path.exists():
            raise CheckpointFormatError(f"{path}: listed in {INDEX_FILE} but missing; download it")
        tensors.update(read_safetensors_header(path))
    return tensors


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id fetched with huggingface_hub (needs the network)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise CheckpointFormatError(f"{path_or_id}: not a model directory (expected config.json + *.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as exc:  # network, auth or unknown repo: one line with the fix
        raise CheckpointFormatError(
            f"{path_or_id}: could not download from the Hugging Face hub ({type(exc).__name__}); "
            "download it elsewhere and pass the local directory"
        ) from exc


def read_config(directory: Path) -> tuple[DecoderConfig, dict[str, Any]]:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointFormatError(f"{path}: missing; a model directory needs config.json")
    try:
        hf = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointFormatError(f"{path}: not valid JSON ({exc})") from exc
    return DecoderConfig.from_hf(hf, source=str(path)), hf


@dataclasses.dataclass
class Pretrained:
    """A loaded model: the NNX module, its tokenizer (or None), and where it came from.

    ``identity`` names the base model (its path or hub id) and ``weights_hash`` is a
    BLAKE2b digest of every base tensor's name, dtype, shape and bytes, computed
    while loading: checkpoints of adapters record both and refuse a different base.
    """

    model: Decoder
    tokenizer: Any
    config: DecoderConfig
    hf_config: dict[str, Any]
    identity: str
    weights_hash: str


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    dtype=jnp.float32,
    lora: LoRAConfig | None = None,
    mesh: Mesh | None = None,
    seed: int = 0,
    tokenizer: bool = True,
) -> Pretrained:
    """Load a Qwen2/Llama/Gemma checkpoint from a local directory (or a hub id, where reachable).

    dtype: the base weights' dtype (fp32 or bf16). lora: add fresh adapters (B = 0).
    mesh: place every weight with its partition spec over this mesh (default: one device).
    """
    directory = resolve_model_dir(path_or_id)
    config, hf_config = read_config(directory)
    tensors = checkpoint_tensors(directory)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise NPSError(f"dtype {dtype} is not supported for base weights; use float32 or bfloat16")

    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, base_state = nnx.split(abstract, BaseParam)
    digest = hashlib.blake2b(digest_size=16)
    flat = []
    for path, var in nnx.to_flat_state(base_state):
        name = path[-1]
        value = _load_param(name, var.shape, tensors, config, dtype, param_sharding(name, var.shape, mesh), digest)
        flat.append((path, var.replace(value)))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if lora is not None:
        model.add_lora(lora, rngs=nnx.Rngs(seed), mesh=mesh)
    return Pretrained(
        model=model,
        tokenizer=load_tokenizer(directory, config) if tokenizer else None,
        config=config,
        hf_config=hf_config,
        identity=str(path_or_id),
        weights_hash=digest.hexdigest(),
    )


# Host memory used per read: tensors are copied in row chunks of at most this size.
CHUNK_BYTES = 4 * 2**20


def _load_param(name, shape, tensors, config, dtype, sharding, digest) -> jax.Array:
    """One base weight in ``dtype`` and ``sharding``, written chunk by chunk into a preallocated array.

    Per-block weights gather L checkpoint tensors (one per layer) into one stacked array.
    """
    target = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    if name in ("embed", "final_norm", "lm_head"):
        return _copy_tensor(target, hf_name(name), shape, (), tensors, dtype, digest)
    for layer in range(config.num_layers):
        target = _copy_tensor(target, hf_name(name, layer), shape[1:], (layer,), tensors, dtype, digest)
    return target


def _copy_tensor(target, hf: str, shape, prefix, tensors, dtype, digest) -> jax.Array:
    """Copy checkpoint tensor ``hf`` (checked against ``shape``) into ``target[prefix]``, in row chunks."""
    info = tensors.get(hf)
    if info is None:
        raise CheckpointFormatError(f"tensor {hf!r} is missing from the checkpoint; is this the right model directory?")
    if info.shape != tuple(shape):
        raise CheckpointFormatError(
            f"{info.file}: tensor {hf!r} has shape {list(info.shape)} but config.json implies {list(shape)}"
        )
    digest.update(f"{hf}|{info.dtype}|{info.shape}|".encode())
    rows = shape[0]
    step = max(1, CHUNK_BYTES // max(1, (info.stop - info.start) // rows))
    for start in range(0, rows, step):
        chunk = read_tensor(info, (start, min(start + step, rows)))
        digest.update(memoryview(chunk.reshape(-1).view(np.uint8)))
        index = jnp.asarray((*prefix, start) + (0,) * (len(shape) - 1), jnp.int32)
        target = _write_chunk(target, index, chunk.astype(dtype, copy=False).reshape((1,) * len(prefix) + chunk.shape))
    return target


@functools.partial(jax.jit, donate_argnums=0)
def _write_chunk(target: jax.Array, index: jax.Array, chunk: jax.Array) -> jax.Array:
    """target with ``chunk`` written at ``index`` (in place: the target's buffer is donated)."""
    return jax.lax.dynamic_update_slice(target, chunk, tuple(index))


def load_tokenizer(directory: Path, config: DecoderConfig):
    """The checkpoint's tokenizer (chat template included) via transformers, checked against the vocabulary."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many types for a missing/broken tokenizer
        raise CheckpointFormatError(
            f"{directory}: could not load its tokenizer ({type(exc).__name__}: {exc}); "
            "pass tokenizer=False to load the weights alone"
        ) from exc
    if len(tokenizer) > config.vocab_size:
        raise CheckpointFormatError(
            f"{directory}: the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is "
            f"{config.vocab_size}; the tokenizer belongs to another model"
        )
    return tokenizer


NUMPY_TO_SAFETENSORS = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: list[tuple[str, Any]], metadata: dict[str, str] | None = None) -> None:
    """Write (name, array) pairs as one safetensors file, one tensor at a time, atomically.

    The header is computed from shapes first, so no second copy of the tensors is
    built; the file appears under its name only once complete.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, array in tensors:
        dtype = np.dtype(array.dtype)
        if dtype not in NUMPY_TO_SAFETENSORS:
            raise NPSError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store here")
        nbytes = int(np.prod(array.shape)) * dtype.itemsize
        header[name] = {"dtype": NUMPY_TO_SAFETENSORS[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, array in tensors:
            f.write(memoryview(np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8)))
    os.replace(partial, path)


def save_pretrained(model: Decoder, directory: str | os.PathLike, hf_config: dict[str, Any]) -> Path:
    """Export the base weights (merge LoRA first to include it) as a Hugging Face checkpoint.

    Writes ``config.json`` (``hf_config`` with the weights' dtype) and ``model.safetensors``
    in transformers' names and layout, loadable by transformers and by ``from_pretrained``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = []
    for path, var in nnx.to_flat_state(nnx.state(model, BaseParam)):
        name, value = str(path[-1]), var[...]
        if name in ("embed", "final_norm", "lm_head"):
            tensors.append((hf_name(name), value))
        else:
            tensors.extend((hf_name(name, layer), value[layer]) for layer in range(model.config.num_layers))
    tensors.sort(key=lambda item: item[0])
    write_safetensors(directory / SINGLE_FILE, tensors, metadata={"format": "pt"})
    config = dict(hf_config, dtype=str(model.dtype))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
