"""Load Hugging Face decoder checkpoints (config.json + safetensors + tokenizer) into ``Decoder``.

Everything is checked before anything is allocated: ``config.json`` field by field,
every safetensors header (parsed here, with the reference library's rules: a JSON
object of typed entries whose byte ranges tile the data section exactly), and every
tensor's name and shape against the model that config describes (``nps.lm.params``
names them). A bad file is reported by name, with the tensor or field and the fix,
as ``CheckpointFormatError`` or ``ConfigError``; model files must be regular files
(a FIFO would block forever) and headers and JSON files are read only up to a cap.

Weights then stream tensor by tensor from the files into their final dtype and
sharding: each tensor is read with ``pread`` in row chunks into one host buffer,
cast, placed on the devices, and freed before the next, and per-block tensors are
written into their preallocated stacked array in place (a donated update). Host
memory therefore peaks at the model plus one chunk, never two copies of the model;
no file is memory-mapped (mapped pages would count against the process too).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import stat
import struct
from pathlib import Path, PurePosixPath
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nps.errors import NPSError
from nps.files import Digest, atomic_open, atomic_write_json
from nps.layers import BaseParam
from nps.lm.decoder import Decoder, DecoderConfig, LoRAConfig
from nps.lm.params import TensorName, is_stacked, tensor_names
from nps.lm.sharding import variable_sharding

SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The reference safetensors library refuses larger headers (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# config.json, the index and adapter configs are kilobytes; a larger one is not one of them.
MAX_JSON_BYTES = 16 * 2**20
# Files transformers' AutoTokenizer may open in a model folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


class CheckpointFormatError(NPSError):
    """A model directory is missing a file, or a file does not hold what it should."""


def regular_file(path: Path, what: str) -> int:
    """The size of ``path``, which must exist and be a regular file (links to one are fine)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: missing; {what}") from None
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a directory" if stat.S_ISDIR(info.st_mode) else "not a file"
        raise CheckpointFormatError(f"{path}: is {kind}, not a regular file; replace it with the file itself")
    return info.st_size


def read_json(path: Path, what: str) -> Any:
    """A model folder's JSON file, refused if not a regular file, over ``MAX_JSON_BYTES`` or not JSON."""
    size = regular_file(path, what)
    if size > MAX_JSON_BYTES:
        raise CheckpointFormatError(
            f"{path}: {size} bytes, more than the {MAX_JSON_BYTES} a JSON file of a model folder may have; "
            "is it the right file?"
        )
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointFormatError(f"{path}: not valid JSON ({reason}); re-download or re-save it") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"name {next(n for n in names if names.count(n) > 1)!r} appears twice")
    return dict(pairs)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's header and check it as the reference library does.

    The header must be a JSON object (at most ``MAX_HEADER_BYTES``) of entries
    ``{"dtype", "shape", "data_offsets"}`` whose byte ranges match their shapes and
    tile the data section exactly: no negative offsets, overlaps, gaps or trailing
    bytes. Only the header is read.
    """
    size = regular_file(path, "download it")
    bad = f"{path}: not a valid safetensors file"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointFormatError(f"{path}: too short to be a safetensors file (truncated download?)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointFormatError(
                f"{bad}: its header claims {header_len} bytes, over the {MAX_HEADER_BYTES} limit; re-download it"
            )
        if header_len > size - 8:
            raise CheckpointFormatError(f"{path}: header length {header_len} exceeds the file (truncated?)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_names)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointFormatError(f"{bad}: its header is not valid JSON ({reason}); re-download it") from None
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise CheckpointFormatError(f"{bad}: its header is a JSON {kind}, not an object; re-download it")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise CheckpointFormatError(f"{bad}: __metadata__ must map names to strings; re-download it")
            continue
        where = f"{bad}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise CheckpointFormatError(f"{where} needs an object with dtype, shape and data_offsets; re-download it")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
            raise CheckpointFormatError(f"{where} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointFormatError(
                f"{where} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end; re-download it"
            )
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(SAFETENSORS_DTYPES)}"
            )
        begin, end = offsets
        if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise CheckpointFormatError(f"{where}: its byte range does not match its shape {shape}")
        if end > data_size:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} (truncated?)"
            )
        tensors[name] = TensorInfo(path, SAFETENSORS_DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)
    _check_layout(tensors, data_start, size, bad)
    return tensors


def _check_layout(tensors: dict[str, TensorInfo], data_start: int, size: int, bad: str) -> None:
    """The tensors' byte ranges must tile [data_start, size) in some order, as the reference requires."""
    position, previous = data_start, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].stop)):
        if info.start < position:
            raise CheckpointFormatError(f"{bad}: tensor {name!r} overlaps tensor {previous!r}; re-download it")
        if info.start > position:
            raise CheckpointFormatError(
                f"{bad}: {info.start - position} bytes lie unused before tensor {name!r} (the data is not "
                "contiguous); re-download it"
            )
        position, previous = info.stop, name
    if position != size:
        raise CheckpointFormatError(f"{bad}: {size - position} bytes follow the last tensor; re-download it")


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


def _shard_path(directory: Path, index: Path, name) -> Path:
    """A file named by the index, which must stay inside the model folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointFormatError(f"{index}: weight_map names a file {name!r}, not a file name; re-download it")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise CheckpointFormatError(
            f"{index}: weight_map names {name!r}, outside the model folder; an index may only name files "
            "inside its folder"
        )
    return directory / name


def checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a single-file or sharded (index.json) safetensors checkpoint, headers checked."""
    index = directory / INDEX_FILE
    if index.exists() or index.is_symlink():
        content = read_json(index, "download it")
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index}: not a safetensors index (no 'weight_map' object); re-download it")
        files = {name: _shard_path(directory, index, file) for name, file in weight_map.items()}
    elif (directory / SINGLE_FILE).exists() or (directory / SINGLE_FILE).is_symlink():
        files = {}
    else:
        found = sorted(p.name for p in directory.glob("*.safetensors")) or ["none"]
        raise CheckpointFormatError(
            f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (safetensors files found: {', '.join(found)}); "
            "nps reads safetensors only (convert .bin/pickle checkpoints with transformers' save_pretrained)"
        )
    tensors: dict[str, TensorInfo] = {}
    for path in sorted(set(files.values())) or [directory / SINGLE_FILE]:
        if files:
            regular_file(path, f"{INDEX_FILE} lists it; download it")
        for name, info in read_safetensors_header(path).items():
            if name in tensors:
                raise CheckpointFormatError(
                    f"{path}: tensor {name!r} is also in {tensors[name].file.name}; a checkpoint holds each "
                    "tensor once (mixed downloads?)"
                )
            tensors[name] = info
    for name, path in files.items():
        if name not in tensors or tensors[name].file != path:
            raise CheckpointFormatError(
                f"{index}: lists tensor {name!r} in {path.name}, which does not hold it; re-download the checkpoint"
            )
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
    hf = read_json(path, "a model directory needs config.json")
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


def _hash_order(item: tuple[TensorName, Any]) -> tuple[bool, str]:
    """Per-block weights first, each group by role name: the order the weights hash has always
    used (nps 0.1's parameter names), so hashes recorded in adapters and checkpoints stay valid."""
    return not is_stacked(item[0]), item[0].role


def plan_load(base: nnx.State, tensors: dict[str, TensorInfo], config: DecoderConfig, source: str):
    """[(path, abstract variable, its checkpoint tensors)] in hash order, every tensor checked
    against the shape ``config`` implies; raises before anything is allocated."""
    names = tensor_names(config.model_type)
    rows = sorted(((names[path], (path, var)) for path, var in nnx.to_flat_state(base)), key=_hash_order)
    plan = []
    for row, (path, var) in rows:
        stacked = is_stacked(row)
        shape = tuple(var.shape[1:] if stacked else var.shape)
        infos = []
        for hf in (row.hf.format(layer=layer) for layer in range(config.num_layers)) if stacked else [row.hf]:
            info = tensors.get(hf)
            if info is None:
                raise CheckpointFormatError(
                    f"tensor {hf!r} is missing from the checkpoint; is this the right model directory?"
                )
            if info.shape != shape:
                raise CheckpointFormatError(
                    f"{info.file}: tensor {hf!r} has shape {list(info.shape)} but {source} implies {list(shape)}"
                )
            infos.append((hf, info))
        plan.append((path, var, infos))
    return plan


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
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise NPSError(f"dtype {dtype} is not supported for base weights; use float32 or bfloat16")
    directory = resolve_model_dir(path_or_id)
    config, hf_config = read_config(directory)
    tensors = checkpoint_tensors(directory)
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, base_state = nnx.split(abstract, BaseParam)
    plan = plan_load(base_state, tensors, config, str(directory / "config.json"))
    loaded_tokenizer = load_tokenizer(directory, config) if tokenizer else None  # its files too, before allocating
    digest = Digest()
    flat = []
    for path, var, infos in plan:
        sharding = variable_sharding(var, mesh)
        target = _allocate(tuple(var.shape), dtype, sharding)
        for layer, (hf, info) in enumerate(infos):
            prefix = (layer,) if var.ndim > len(info.shape) else ()  # a per-block tensor's slot in the stack
            target = _copy_tensor(target, hf, info, prefix, dtype, digest)
        flat.append((path, var.replace(target)))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if lora is not None:
        model.add_lora(lora, rngs=nnx.Rngs(seed), mesh=mesh)
    return Pretrained(
        model=model,
        tokenizer=loaded_tokenizer,
        config=config,
        hf_config=hf_config,
        identity=str(path_or_id),
        weights_hash=digest.hexdigest(),
    )


# Host memory used per read: tensors are copied in row chunks of at most this size.
CHUNK_BYTES = 4 * 2**20


def _copy_tensor(target, hf: str, info: TensorInfo, prefix, dtype, digest: Digest) -> jax.Array:
    """Copy checkpoint tensor ``hf`` into ``target[prefix]`` in row chunks, feeding the digest."""
    digest.raw(f"{hf}|{info.dtype}|{info.shape}|".encode())
    rows = info.shape[0] if info.shape else 1
    step = max(1, CHUNK_BYTES // max(1, (info.stop - info.start) // max(rows, 1)))
    for start in range(0, rows, step):
        chunk = read_tensor(info, (start, min(start + step, rows)))
        digest.raw(memoryview(chunk.reshape(-1).view(np.uint8)))
        index = jnp.asarray((*prefix, start) + (0,) * (len(info.shape) - 1), jnp.int32)
        target = _write_chunk(target, index, chunk.astype(dtype, copy=False).reshape((1,) * len(prefix) + chunk.shape))
    return target


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "sharding"))
def _allocate(shape: tuple[int, ...], dtype, sharding) -> jax.Array:
    """Zeros of ``shape`` created where they will live (``sharding``; None: the default device):
    no host copy, and one compilation per distinct (shape, dtype, sharding)."""
    zeros = jnp.zeros(shape, dtype)
    return zeros if sharding is None else jax.lax.with_sharding_constraint(zeros, sharding)


@functools.partial(jax.jit, donate_argnums=0)
def _write_chunk(target: jax.Array, index: jax.Array, chunk: jax.Array) -> jax.Array:
    """target with ``chunk`` written at ``index`` (in place: the target's buffer is donated)."""
    return jax.lax.dynamic_update_slice(target, chunk, tuple(index))


def load_tokenizer(directory: Path, config: DecoderConfig):
    """The checkpoint's tokenizer (chat template included) via transformers, checked against the vocabulary."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_FILES:  # transformers would block on a FIFO or read a directory's error late
        if (directory / name).exists():
            regular_file(directory / name, "")  # exists: only its kind is in question
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
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, array in tensors:
            f.write(memoryview(np.ascontiguousarray(np.asarray(array)).reshape(-1).view(np.uint8)))


def save_pretrained(model: Decoder, directory: str | os.PathLike, hf_config: dict[str, Any]) -> Path:
    """Export the base weights (merge LoRA first to include it) as a Hugging Face checkpoint.

    Writes ``config.json`` (``hf_config`` with the weights' dtype) and ``model.safetensors``
    in transformers' names and layout, loadable by transformers and by ``from_pretrained``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = tensor_names(model.config.model_type)
    tensors = []
    for path, var in nnx.to_flat_state(nnx.state(model, BaseParam)):
        row, value = names[path], var[...]
        if is_stacked(row):
            tensors.extend((row.hf.format(layer=layer), value[layer]) for layer in range(model.config.num_layers))
        else:
            tensors.append((row.hf, value))
    tensors.sort(key=lambda item: item[0])
    write_safetensors(directory / SINGLE_FILE, tensors, metadata={"format": "pt"})
    atomic_write_json(directory / "config.json", dict(hf_config, dtype=str(model.dtype)))
    return directory
