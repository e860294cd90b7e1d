"""Bad model files: malformed safetensors, configs that lie, hostile index paths, FIFOs, bad adapters.

Each bad input must end in one ``CheckpointFormatError`` or ``ConfigError`` (the CLI's one
line, exit 2) that names the file and the tensor or field, before any weight is allocated,
and without blocking.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from tiny_lm import hf_config, padded_batch, write_nps_model
from uf_fixture import write_random_jsonl

from nps.cli import main
from nps.errors import ConfigError
from nps.lm import CheckpointFormatError, LoRAConfig, from_pretrained, loading
from nps.lm.loading import INDEX_FILE, SINGLE_FILE, read_safetensors_header, read_tensor, write_safetensors
from nps.lm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapters, save_adapters


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    write_nps_model(directory, "qwen2", seed=1)
    return directory


@pytest.fixture
def model_copy(good_dir, tmp_path):
    """A writable copy of the good model folder."""
    return Path(shutil.copytree(good_dir, tmp_path / "model"))


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if loading allocates any weight."""
    def refuse(*_):
        raise AssertionError("a weight was allocated before the bad file was refused")

    monkeypatch.setattr(loading, "_allocate", refuse)


@pytest.fixture
def fifo():
    """``fifo(path)`` replaces ``path`` with a named pipe. Should a reader block on it anyway, a
    helper thread opens and closes its write end, so the reader sees end-of-file: a regression
    fails the test instead of hanging the suite."""
    stop, threads = threading.Event(), []

    def unblock(path):
        while not stop.wait(0.2):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader waits
            except OSError:
                continue

    def make(path: Path) -> Path:
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        threads.append(threading.Thread(target=unblock, args=(path,), daemon=True))
        threads[-1].start()
        return path

    yield make
    stop.set()
    for thread in threads:
        thread.join()


def refused(error, directory, match):
    """``from_pretrained(directory)`` raises ``error`` matching ``match`` (a regex)."""
    with pytest.raises(error, match=match):
        from_pretrained(directory, tokenizer=False)


def raw_safetensors(header, data: bytes = b"", declared: int | None = None) -> bytes:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if declared is None else declared) + encoded + data


def f32(begin, end, shape=(4,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


SAFETENSORS_FAULTS = {
    # name: (file bytes, the error after "<file>: not a valid safetensors file: ", the reference refuses it too)
    "negative offsets (weights read from the header)": (
        raw_safetensors({"a": f32(-16, 0)}), r"tensor 'a' has data_offsets \[-16, 0\]", True),
    "overlapping tensors": (
        raw_safetensors({"a": f32(0, 16), "b": f32(8, 24)}, bytes(24)), r"tensor 'b' overlaps tensor 'a'", True),
    "a gap between tensors": (
        raw_safetensors({"a": f32(0, 16), "b": f32(24, 40)}, bytes(40)), r"8 bytes lie unused before tensor 'b'", True),
    "data not starting at the header": (
        raw_safetensors({"a": f32(8, 24)}, bytes(24)), r"8 bytes lie unused before tensor 'a'", True),
    "bytes after the last tensor": (
        raw_safetensors({"a": f32(0, 16)}, bytes(24)), r"8 bytes follow the last tensor", True),
    "a JSON list as the header": (raw_safetensors(b"[1, 2]"), r"its header is a JSON list, not an object", True),
    "an entry that is not an object": (
        raw_safetensors({"a": 5}), r"tensor 'a' needs an object with dtype, shape and data_offsets", True),
    "string offsets": (
        raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, bytes(16)),
        r"tensor 'a' has data_offsets \['0', '16'\]", True),
    "a negative dimension": (
        raw_safetensors({"a": f32(0, 16, (-4,))}, bytes(16)), r"tensor 'a' has shape \[-4\]", True),
    "deep nesting": (
        raw_safetensors(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), r"nested too deeply", True),
    "non-string metadata": (
        raw_safetensors({"__metadata__": {"format": 1}, "a": f32(0, 16)}, bytes(16)),
        r"__metadata__ must map names to strings", True),
    # The reference keeps the last of two entries of one name; nps will not guess which is meant.
    "a tensor named twice": (
        raw_safetensors(b'{"a":' + json.dumps(f32(0, 16)).encode() + b',"a":' + json.dumps(f32(0, 16)).encode()
                        + b"}", bytes(16)),
        r"name 'a' appears twice", False),
}


@pytest.mark.parametrize("fault", list(SAFETENSORS_FAULTS))
def test_malformed_safetensors_are_refused_naming_file_and_tensor(fault, model_copy, no_allocation):
    content, message, reference_refuses = SAFETENSORS_FAULTS[fault]
    path = model_copy / SINGLE_FILE
    path.write_bytes(content)
    if reference_refuses:
        with pytest.raises(safetensors.SafetensorError):
            safetensors.numpy.load_file(path)
    refused(CheckpointFormatError, model_copy, re.escape(f"{path}: not a valid safetensors file") + ".*" + message)


def test_a_huge_declared_header_is_refused_unread(model_copy, no_allocation):
    """A sparse 3 GiB file whose header claims 3 GiB: refused by the cap, not read into memory."""
    path = model_copy / SINGLE_FILE
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 3 * 2**30))
        f.truncate(8 + 3 * 2**30)
    refused(CheckpointFormatError, model_copy, re.escape(str(path)) + r".*claims 3221225472 bytes, over the 100000000")


def test_a_fifo_in_place_of_a_model_file_is_refused_without_blocking(model_copy, fifo, no_allocation):
    for name in (SINGLE_FILE, "config.json"):
        broken = Path(shutil.copytree(model_copy, model_copy.parent / f"fifo-{name}"))
        path = fifo(broken / name)
        refused(CheckpointFormatError, broken, re.escape(f"{path}: is a FIFO, not a regular file"))
    fifo(model_copy / "tokenizer.json")
    with pytest.raises(CheckpointFormatError, match=re.escape(f"{model_copy / 'tokenizer.json'}: is a FIFO")):
        from_pretrained(model_copy)


def hf_dict(family: str) -> dict:
    return hf_config(family).to_dict()


CONFIG_FAULTS = {
    # name: (config.json's content, built when the test runs, error class, message). Built at collection,
    # the transformers configs would import transformers and torch into every worker.
    "vocab 10^7 on a 0.7 MB checkpoint": (
        lambda: dict(hf_dict("qwen2"), vocab_size=10**7), CheckpointFormatError,
        r"tensor 'model.embed_tokens.weight' has shape \[320, 64\] but .*config.json implies \[10000000, 64\]"),
    "vocab 10^12": (lambda: dict(hf_dict("qwen2"), vocab_size=10**12), CheckpointFormatError,
                    r"implies \[1000000000000, 64\]"),
    "10^9 layers": (lambda: dict(hf_dict("qwen2"), num_hidden_layers=10**9), CheckpointFormatError,
                    r"tensor 'model.layers.3.input_layernorm.weight' is missing"),
    "zero heads": (lambda: dict(hf_dict("qwen2"), num_attention_heads=0), ConfigError,
                   r"num_attention_heads=0 must be"),
    "a string vocabulary size": (lambda: dict(hf_dict("qwen2"), vocab_size="320"), ConfigError,
                                 r"vocab_size='320' must be an integer"),
    "a negative vocabulary size": (lambda: dict(hf_dict("qwen2"), vocab_size=-5), ConfigError,
                                   r"vocab_size=-5 must be a positive integer"),
    "a JSON list": (lambda: [hf_dict("qwen2")], ConfigError, r"must hold a JSON object of config fields, not a list"),
    "heads not a multiple of key/value heads": (lambda: dict(hf_dict("qwen2"), num_key_value_heads=3), ConfigError,
                                                r"num_heads=4 must be a multiple of num_kv_heads=3"),
    "an odd head_dim": (lambda: dict(hf_dict("qwen2"), head_dim=15), ConfigError, r"head_dim=15 must be even"),
    "a NaN epsilon": (lambda: dict(hf_dict("qwen2"), rms_norm_eps=float("nan")), ConfigError,
                      r"rms_norm_eps=nan must be a positive finite number"),
    "a string boolean": (lambda: dict(hf_dict("qwen2"), tie_word_embeddings="false"), ConfigError,
                         r"tie_word_embeddings='false' must be true or false"),
    "rope parameters that are not an object": (lambda: dict(hf_dict("qwen2"), rope_parameters="linear"), ConfigError,
                                               r"rope_parameters='linear' must be a JSON object"),
    "qwen2: a string use_sliding_window": (lambda: dict(hf_dict("qwen2"), use_sliding_window="no"), ConfigError,
                                           r"use_sliding_window='no' must be true or false"),
    "llama: a string RoPE factor": (
        lambda: dict(hf_dict("llama"), rope_parameters=dict(hf_dict("llama")["rope_parameters"], factor="8")),
        ConfigError, r"rope_parameters.factor='8' must be a number"),
    "llama: RoPE high frequency factor not above the low": (
        lambda: dict(hf_dict("llama"), rope_parameters=dict(hf_dict("llama")["rope_parameters"], high_freq_factor=1.0)),
        ConfigError, r"rope_high_freq_factor=1.0 must exceed rope_low_freq_factor=1.0"),
    "gemma: a numeric activation": (lambda: dict(hf_dict("gemma"), hidden_activation=5), ConfigError,
                                    r"hidden_activation=5 must be a string"),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_config_is_checked_field_by_field_before_any_allocation(fault, model_copy, no_allocation):
    content, error, message = CONFIG_FAULTS[fault]
    path = model_copy / "config.json"
    path.write_text(json.dumps(content()))
    with pytest.raises(error, match=message) as caught:
        from_pretrained(model_copy, tokenizer=False)
    if error is ConfigError:  # the file first, the fix last, each once
        assert str(caught.value).startswith(f"{path}: ") and str(caught.value).count(str(path)) == 2
        assert str(caught.value).endswith(f"; fix {path} (is it this model's own config?)")


def test_an_oversized_config_is_refused_unread(model_copy, no_allocation):
    path = model_copy / "config.json"
    with open(path, "wb") as f:
        f.truncate(32 * 2**20)
    refused(CheckpointFormatError, model_copy, re.escape(f"{path}: 33554432 bytes, more than the 16777216"))


def shard(directory: Path, parts: dict[str, list[str]], weight_map: dict[str, str] | None = None) -> None:
    """Split the folder's single file into ``parts`` (file name: tensor names) and write an index."""
    tensors = read_safetensors_header(directory / SINGLE_FILE)
    for file, names in parts.items():
        write_safetensors(directory / file, [(n, read_tensor(tensors[n])) for n in names])
    (directory / SINGLE_FILE).unlink()
    default = {n: file for file, names in parts.items() for n in names}
    (directory / INDEX_FILE).write_text(json.dumps({"weight_map": default if weight_map is None else weight_map}))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/tmp/elsewhere.safetensors", "sub/../../x.safetensors"])
def test_index_paths_must_stay_inside_the_model_folder(target, model_copy, no_allocation):
    names = sorted(read_safetensors_header(model_copy / SINGLE_FILE))
    shard(model_copy, {"a.safetensors": names}, {names[0]: target, **{n: "a.safetensors" for n in names[1:]}})
    refused(CheckpointFormatError, model_copy,
            re.escape(f"{model_copy / INDEX_FILE}: weight_map names {target!r}, outside the model folder"))


def test_index_must_map_each_tensor_to_the_one_file_holding_it(model_copy, no_allocation):
    names = sorted(read_safetensors_header(model_copy / SINGLE_FILE))
    index = model_copy / INDEX_FILE
    shard(model_copy, {"a.safetensors": names[:3], "b.safetensors": names[2:]})  # names[2] in both
    refused(CheckpointFormatError, model_copy,
            rf"b.safetensors: tensor '{re.escape(names[2])}' is also in a.safetensors")
    write_safetensors(model_copy / "b.safetensors", [(n, np.zeros(1, np.float32)) for n in names[3:]])
    weight_map = {n: "a.safetensors" for n in names[:3]} | {n: "b.safetensors" for n in names[3:]}
    weight_map[names[0]] = "b.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    refused(CheckpointFormatError, model_copy,
            re.escape(f"{index}: lists tensor {names[0]!r} in b.safetensors, which does not hold it"))
    for content in ([1, 2], {"weight_map": ["a.safetensors"]}):
        index.write_text(json.dumps(content))
        refused(CheckpointFormatError, model_copy, re.escape(f"{index}: not a safetensors index"))


@pytest.fixture(scope="module")
def adapters(good_dir, tmp_path_factory):
    """A directory of saved adapters (q, v; rank 2) for the good model, and its weights hash."""
    pretrained = from_pretrained(good_dir, tokenizer=False, lora=LoRAConfig(rank=2))
    directory = tmp_path_factory.mktemp("adapters")
    save_adapters(pretrained.model, directory, base_identity="qwen", base_weights_hash=pretrained.weights_hash)
    return directory, pretrained.weights_hash


ADAPTER_CONFIG_FAULTS = {
    "targets as one string": ({"targets": "qv"}, r"lora.targets='qv' must be a list of projection names"),
    "a fractional rank": ({"rank": 2.5}, r"lora.rank=2.5 must be a positive integer"),
    "a string rank": ({"rank": "2"}, r"lora.rank='2' must be a positive integer"),
    "a string alpha": ({"alpha": "4"}, r"lora.alpha='4' must be a finite number"),
    "no rank": ({"rank": None}, r"field 'rank' is missing"),
    "a newer format": ({"format": 2}, r"format=2; this nps reads format 1"),
}


@pytest.mark.parametrize("fault", list(ADAPTER_CONFIG_FAULTS) + ["a JSON list", "a FIFO", "bad weights",
                                                                  "a missing tensor"])
def test_bad_adapter_files_are_refused_and_leave_the_model_alone(fault, good_dir, adapters, tmp_path, fifo):
    source, weights_hash = adapters
    directory = Path(shutil.copytree(source, tmp_path / "adapters"))
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    saved = json.loads(config_path.read_text())
    path = config_path
    if fault in ADAPTER_CONFIG_FAULTS:
        change, message = ADAPTER_CONFIG_FAULTS[fault]
        config_path.write_text(json.dumps({k: v for k, v in (saved | change).items() if v is not None}))
    elif fault == "a JSON list":
        config_path.write_text(json.dumps([saved]))
        message = "must hold a JSON object, not a list"
    elif fault == "a FIFO":
        fifo(config_path)
        message = "is a FIFO, not a regular file"
    elif fault == "bad weights":
        path = weights_path
        weights_path.write_bytes(raw_safetensors({"q_a": f32(-16, 0)}))
        message = r"not a valid safetensors file: tensor 'q_a' has data_offsets \[-16, 0\]"
    else:
        path = weights_path
        tensors = read_safetensors_header(weights_path)
        write_safetensors(weights_path, [(n, read_tensor(tensors[n])) for n in sorted(tensors) if n != "v_b"])
        message = r"tensor 'v_b' is missing"
    model = from_pretrained(good_dir, tokenizer=False).model
    tokens, mask = (jnp.asarray(x) for x in padded_batch())
    before = np.asarray(model(tokens, mask))
    with pytest.raises(CheckpointFormatError, match=re.escape(f"{path}: ") + message):
        load_adapters(model, directory, base_weights_hash=weights_hash)
    assert model.lora_config is None
    np.testing.assert_array_equal(model(tokens, mask), before)


def test_the_cli_reports_a_bad_model_file_in_one_line(model_copy, tmp_path, capsys):
    (model_copy / SINGLE_FILE).write_bytes(raw_safetensors({"a": f32(-16, 0)}))
    release = write_random_jsonl(tmp_path / "ultrafeedback.jsonl", num_prompts=80)
    args = ["reproduce", "hh-dpo", "--model", str(model_copy), "--data", str(release), "--out", str(tmp_path / "run"),
            "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"nps: error: {model_copy / SINGLE_FILE}: not a valid"), err
