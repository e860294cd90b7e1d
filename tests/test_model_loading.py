"""Loading checkpoints: sharded files, clear errors for bad input, memory, and sharding over a mesh."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_lm import padded_batch, write_nps_model, write_tokenizer

from nps.errors import ConfigError
from nps.layers import BaseParam
from nps.lm import CheckpointFormatError, Decoder, DecoderConfig, from_pretrained, save_pretrained
from nps.lm.loading import (INDEX_FILE, SINGLE_FILE, _allocate, read_safetensors_header, read_tensor,
                            write_safetensors)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    write_nps_model(directory, "qwen2", seed=1)
    return directory


def copy_dir(source, target):
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_sharded_checkpoint_loads_like_single_file(model_dir, tmp_path):
    tensors = read_safetensors_header(model_dir / SINGLE_FILE)
    names = sorted(tensors)
    sharded = copy_dir(model_dir, tmp_path / "sharded")
    (sharded / SINGLE_FILE).unlink()
    weight_map = {}
    for part, chunk in enumerate(np.array_split(names, 3)):
        file = f"model-{part + 1:05d}-of-00003.safetensors"
        write_safetensors(sharded / file, [(n, read_tensor(tensors[n])) for n in chunk])
        weight_map.update({n: file for n in chunk})
    (sharded / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single, split = from_pretrained(model_dir), from_pretrained(sharded)
    tokens, mask = (jnp.asarray(x) for x in padded_batch())
    np.testing.assert_array_equal(single.model(tokens, mask), split.model(tokens, mask))
    assert single.weights_hash == split.weights_hash


def test_weights_hash_definition_is_stable(tmp_path):
    """The hash of fixed weights is the value nps has always computed for them: adapters and
    checkpoints record it, and a changed definition would refuse every one of them."""
    expected = {"qwen2": "6e5b516abc8382dcccfca2569750f104", "llama": "698d15eaf597d934df843b63e8a2bd43",
                "gemma": "93911ea5da0e8c2dc000e509debe987e"}
    for family, digest in expected.items():
        directory = tmp_path / family
        write_nps_model(directory, family, tokenizer=False)
        header = read_safetensors_header(directory / SINGLE_FILE)
        fixed = [(name, (np.arange(np.prod(info.shape)) % 7 * 0.01).astype(np.float32).reshape(info.shape))
                 for name, info in sorted(header.items())]
        write_safetensors(directory / SINGLE_FILE, fixed)
        assert from_pretrained(directory, tokenizer=False).weights_hash == digest, family


def test_export_and_reload_keep_every_weight_of_every_layout(tmp_path):
    """Every parameter path has a checkpoint name: biases on every projection, untied and tied heads."""
    for name, config in {
        "llama-biases": DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, o_bias=True,
                                      mlp_bias=True),
        "gemma-tied": DecoderConfig(model_type="gemma", vocab_size=64, hidden_size=32, intermediate_size=48,
                                    num_heads=4, num_kv_heads=1, head_dim=8, qkv_bias=False, tie_word_embeddings=True,
                                    scale_embeddings=True, norm_weight_offset=True, activation="gelu_tanh"),
    }.items():
        model = Decoder(config, rngs=nnx.Rngs(0))
        perturbed = nnx.state(model, BaseParam)  # norms and biases start at constants: make every weight distinct
        for index, (_, var) in enumerate(nnx.to_flat_state(perturbed)):
            var[...] = var[...] + 0.01 * index
        save_pretrained(model, tmp_path / name, config.to_hf())
        loaded = from_pretrained(tmp_path / name, tokenizer=False).model
        before, after = nnx.to_flat_state(nnx.state(model, BaseParam)), nnx.to_flat_state(nnx.state(loaded, BaseParam))
        assert [path for path, _ in before] == [path for path, _ in after], name
        for (path, a), (_, b) in zip(before, after):
            np.testing.assert_array_equal(a[...], b[...], err_msg=f"{name} {path}")


def test_allocation_compiles_once_per_weight_shape(model_dir):
    before = _allocate._cache_size()  # other tests of this process may have loaded models
    first = from_pretrained(model_dir, tokenizer=False).model
    compiled = _allocate._cache_size()
    shapes = {(v.shape, v.dtype) for _, v in nnx.to_flat_state(nnx.state(first, BaseParam))}
    assert compiled - before <= len(shapes) < len(nnx.to_flat_state(nnx.state(first, BaseParam)))
    from_pretrained(model_dir, tokenizer=False)
    assert _allocate._cache_size() == compiled  # a second load compiles nothing new


def test_missing_config(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointFormatError, match=r"config.json: missing"):
        from_pretrained(broken)


def test_unsupported_model_type_lists_the_supported_ones(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    with pytest.raises(ConfigError, match=r"config.json: model_type 'mistral' is not supported; supported: qwen2, llama, gemma"):
        from_pretrained(broken)


def test_truncated_weights_name_the_file_and_tensor(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    data = (broken / SINGLE_FILE).read_bytes()
    (broken / SINGLE_FILE).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors: tensor '.*' ends at byte \d+ but the file has"):
        from_pretrained(broken)
    (broken / SINGLE_FILE).write_bytes(data[:4])
    with pytest.raises(CheckpointFormatError, match="too short to be a safetensors file"):
        from_pretrained(broken)


def test_missing_weights_file_and_missing_shard(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    (broken / SINGLE_FILE).rename(broken / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="nps reads safetensors only"):
        from_pretrained(broken)
    (broken / INDEX_FILE).write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointFormatError,
                       match="model-00001-of-00002.safetensors: missing; model.safetensors.index.json lists it"):
        from_pretrained(broken)


def test_shape_mismatch_and_missing_tensor_are_named(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    with pytest.raises(CheckpointFormatError, match=r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' has shape"):
        from_pretrained(broken)
    (broken / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=4)))
    with pytest.raises(CheckpointFormatError, match=r"tensor 'model.layers.3.* is missing from the checkpoint"):
        from_pretrained(broken)


def test_tokenizer_larger_than_vocabulary_is_refused(model_dir, tmp_path):
    broken = copy_dir(model_dir, tmp_path / "m")
    write_tokenizer(broken, vocab_size=600)
    with pytest.raises(CheckpointFormatError, match=r"tokenizer has \d+ tokens but config.json's vocab_size is 320"):
        from_pretrained(broken)
    assert from_pretrained(broken, tokenizer=False).tokenizer is None


def test_unreachable_hub_id_says_to_pass_a_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointFormatError, match="pass the local directory"):
        from_pretrained("nps-tests/no-such-model")


def test_eight_device_mesh_gives_single_device_logits(model_dir, run_script):
    run_script("tests/scripts/sharded_decoder.py", model_dir, devices=8)


def test_loading_a_few_hundred_mb_peaks_below_1_3x_the_model(run_script):
    out = run_script("benchmarks/bench_load_memory.py", check=False).stdout
    model_mib = float(re.search(r"model in memory: (\d+) MiB", out).group(1))
    ratio = float(re.search(r"peak host memory growth while loading: \d+ MiB = ([0-9.]+)x the model", out).group(1))
    assert 300 <= model_mib <= 500, out  # a few hundred MB: the fixed costs do not dominate
    assert ratio <= 1.3, out


def test_train_step_benchmark_runs_on_a_tiny_model(run_script):
    """The GPU benchmark script stays runnable: its CPU smoke mode must finish and report a loss."""
    out = run_script("benchmarks/bench_lm_train_step.py", "--tiny", "--batch", "2", "--seq", "32", "--steps", "1",
                     "--loss-chunk", "16").stdout
    assert "tokens/s" in out and "loss:" in out, out
