"""Loading checkpoints: sharded files, clear errors for bad input, memory, and sharding over a mesh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_lm import padded_batch, write_nps_model, write_tokenizer

from nps.errors import ConfigError
from nps.lm import CheckpointFormatError, from_pretrained
from nps.lm.loading import INDEX_FILE, SINGLE_FILE, read_safetensors_header, read_tensor, write_safetensors


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
    with pytest.raises(CheckpointFormatError, match="model-00001-of-00002.safetensors: listed in .* but missing"):
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


SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys, jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, "tests")
    from tiny_lm import padded_batch
    from nps.lm import LoRAConfig, SamplingConfig, from_pretrained, generate
    from nps.train.mesh import make_mesh

    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    one = from_pretrained(sys.argv[1], tokenizer=False).model
    many = from_pretrained(sys.argv[1], tokenizer=False, mesh=mesh, lora=LoRAConfig(rank=2)).model
    spec = many.blocks.gate[...].sharding.spec
    assert tuple(spec) == (None, "tensor", "fsdp"), spec
    assert tuple(many.embed[...].sharding.spec) == ("tensor", "fsdp"), many.embed[...].sharding
    tokens, mask = padded_batch(batch=4)
    expected = one(jnp.asarray(tokens), jnp.asarray(mask))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    got = jax.jit(lambda t, m: many(t, m))(jax.device_put(tokens, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
    sampling = SamplingConfig(max_new_tokens=8)
    np.testing.assert_array_equal(generate(many, tokens, sampling=sampling).tokens,
                                  generate(one, tokens, sampling=sampling).tokens)
    print("SHARDED-OK")
    """
)


def test_eight_device_mesh_gives_single_device_logits(model_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, str(model_dir)], capture_output=True, text=True, env=env, timeout=600,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert "SHARDED-OK" in result.stdout, result.stderr[-3000:]


def test_loading_a_few_hundred_mb_peaks_below_1_3x_the_model():
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "bench_load_memory.py")
    result = subprocess.run([sys.executable, script, "--max-ratio", "1.3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "377 MiB on disk" in result.stdout, result.stdout


def test_train_step_benchmark_runs_on_a_tiny_model():
    """The GPU benchmark script stays runnable: its CPU smoke mode must finish and report a loss."""
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "bench_lm_train_step.py")
    result = subprocess.run(
        [sys.executable, script, "--tiny", "--batch", "2", "--seq", "32", "--steps", "1", "--loss-chunk", "16"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tokens/s" in result.stdout and "loss:" in result.stdout, result.stdout
