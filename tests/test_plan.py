"""nps plan: nps's own programs compiled for TPU topologies with abstract weights (libtpu, no TPU),
checked against their analytic FLOPs and memory; the HLO reader against programs whose cost is
known; a replicated activation caught; the command's exit codes and JSON.

The 7B/8B table of docs/scale.md is the slow test at the end (minutes per row).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nps.errors import ConfigError
from nps.lm.decoder import DecoderConfig, LoRAConfig
from nps.plan import PRESETS, Workload, compile_only_environment, format_plan, hlo, make_plan, programs, resolve
from nps.plan.planner import FLOPS_TOLERANCE

# The tests' persistent compilation cache (conftest.py) stores the TPU programs too; JAX, which cannot
# load a program compiled for devices it does not have, says so and compiles again.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for TPUs needs libtpu: pip install -e '.[test]' brings it")
# Every dimension a multiple of 128, as in real models: a TPU pads arrays to whole (8, 128) tiles.
SMALL = DecoderConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=2,
                      num_kv_heads=2, head_dim=128)
LORA = LoRAConfig(rank=128, alpha=256.0)
NP_DPO = Workload("np-dpo", SMALL, batch=8, targets=2, context=2, length=128, lora=LORA, feature_dim=128,
                  latent_dim=128, pairs=1024, options=2048)


@pytest.fixture(scope="module")
def v5e_2x2():
    return resolve("v5e:2x2")


def _scan_of_matmuls(steps: int):
    def program(x, w):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()

    return program, (jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((steps, 32, 32), jnp.float32))


@pytest.mark.parametrize("steps", [2, 5])
def test_the_hlo_reader_counts_each_loop_iteration_of_a_cpu_program(steps):
    program, args = _scan_of_matmuls(steps)
    compiled = jax.jit(program).lower(*args).compile()
    cost = hlo.analyse(compiled.as_text(), 1)
    assert cost.flops == steps * 2 * 64 * 32 * 32  # XLA's own cost analysis counts the body once
    assert not cost.unknown_loops
    gradient = jax.jit(jax.grad(program, argnums=1)).lower(*args).compile()
    assert hlo.analyse(gradient.as_text(), 1).flops == 3 * steps * 2 * 64 * 32 * 32


@needs_libtpu
def test_the_hlo_reader_counts_tpu_convolutions_and_windowed_matmul_loops(v5e_2x2):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    program, (x, w) = _scan_of_matmuls(3)
    mesh = Mesh(np.asarray(v5e_2x2.devices), ("d",))
    x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("d")))
    w = jax.ShapeDtypeStruct((3, 256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(None, "d")))
    compiled = jax.jit(program).lower(x, w).compile()
    cost = hlo.analyse(compiled.as_text(), 4)
    assert cost.flops * 4 == 3 * 2 * 512 * 256 * 256  # each device a quarter of the rows, every layer
    assert compiled.cost_analysis()["flops"] < cost.flops  # what XLA itself reports: one iteration
    assert cost.collective_bytes()["all-gather"] > 0  # the weights' split dimension, gathered


def test_replica_groups_in_each_notation():
    instruction = hlo.Instruction
    explicit = instruction("a", "f32[4]", "all-reduce", [], "", ", replica_groups={{0,2},{1,3}}, to_apply=%add")
    assert hlo.replica_groups(explicit, 4) == [[0, 2], [1, 3]]
    iota = instruction("a", "f32[4]", "all-gather", [], "", ", replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}")
    assert hlo.replica_groups(iota, 4) == [[0, 2], [1, 3]]
    mesh = instruction("a", "f32[4]", "all-gather", [], "", ", replica_groups=mesh['x'=2,'y'=2] {'x'}, dimensions={0}")
    assert hlo.replica_groups(mesh, 4) == [[0, 2], [1, 3]]
    every = instruction("a", "f32[4]", "all-reduce", [], "", ", replica_groups={}, to_apply=%add")
    assert hlo.replica_groups(every, 4) == [[0, 1, 2, 3]]


@needs_libtpu
def test_an_np_dpo_step_for_v5e_2x2_holds_its_analytic_flops_and_memory(v5e_2x2):
    plan = make_plan(NP_DPO, v5e_2x2, model_name="small")
    assert plan.fits and all(plan.checks.values()), format_plan(plan)
    assert plan.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert 1 / FLOPS_TOLERANCE <= plan.flops["ratio"] <= FLOPS_TOLERANCE
    assert plan.memory["total"] <= plan.memory["capacity"] == 15.75 * 2**30
    # The weights and the options table are split over the 4 chips, not copied.
    assert plan.analytic_memory["data"] < 0.3 * _global_bytes(NP_DPO)
    assert plan.collectives["all-gather"] > 0 and plan.roofline["step_s"] > 0
    assert "no replicated work ✓" in format_plan(plan)


def _global_bytes(workload: Workload) -> float:
    return workload.options * (workload.length * (4 + 1 + 1) + workload.feature_dim * 4 + 4)


@needs_libtpu
def test_a_replicated_activation_is_caught_by_the_flops_check(v5e_2x2, monkeypatch):
    """The failure that opened issue 21: tasks not split over the devices and activations whole on
    each. On a data-parallel mesh XLA still splits some products on its own between the
    constraints; the rest of every sequence's work is repeated on every device."""
    from nps.lm import sharding
    from nps.train import loop

    monkeypatch.setattr(loop, "_tasks_split", lambda episodes, mesh: episodes)
    monkeypatch.setitem(sharding.RULES, "activation_batch", ())
    jax.clear_caches()  # jit would otherwise reuse the step traced with the rules as they are
    try:
        plan = make_plan(NP_DPO, v5e_2x2, {"data": 4, "fsdp": 1, "tensor": 1}, model_name="small")
    finally:
        jax.clear_caches()  # nor may a later test reuse this one
    assert plan.flops["ratio"] > 1.3 and not plan.checks["no replicated work"], format_plan(plan)
    assert "no replicated work ✗" in format_plan(plan)


@needs_libtpu
def test_a_generation_step_for_v5e_2x2_splits_the_cache_by_heads(v5e_2x2):
    workload = Workload("generate", SMALL, batch=8, length=128, new_tokens=384, lora=LORA, latent_dim=128)
    plan = make_plan(workload, v5e_2x2, model_name="small")
    assert plan.mesh == {"data": 1, "fsdp": 2, "tensor": 2}  # two key-value heads: tensor parallel over 2
    assert plan.fits and all(plan.checks.values()), format_plan(plan)
    cache = 2 * SMALL.num_layers * 8 * 512 * SMALL.num_kv_heads * SMALL.head_dim * 2  # bf16, as the weights
    assert plan.analytic_memory["KV cache"] == cache / 4  # batch over fsdp 2, heads over tensor 2
    assert plan.roofline["tokens_per_second"] > 0


@needs_libtpu
def test_two_slices_send_only_the_gradient_sum_over_the_slow_network():
    plan = make_plan(dataclasses.replace(NP_DPO, batch=16), resolve("v5e:2x2", slices=2), model_name="small")
    assert plan.slices == 2 and plan.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    assert plan.fits and plan.checks["no replicated work"], format_plan(plan)
    crossing = plan.slow_network
    assert crossing.get("all-reduce", 0) > 0 and set(crossing) <= {"all-reduce", "all-gather"}, crossing
    # The gradient sum (each device its shard of the trainable parameters' gradient) and the step's
    # metrics; no weights, no activations.
    trainable = sum(np.prod(leaf.shape) * 4 for leaf in jax.tree.leaves(
        nnx.state(programs._policy(NP_DPO), nnx.Param)))
    assert crossing["all-reduce"] < trainable / 4 * 1.5, (crossing, trainable)


def test_bad_requests_are_one_line_each():
    with pytest.raises(ConfigError, match="--job='sft' is unknown"):
        Workload("sft", SMALL)
    with pytest.raises(ConfigError, match="--remat='some' is unknown"):
        Workload("np-dpo", SMALL, remat="some")
    with pytest.raises(ConfigError, match="--topology='v9x:2x2' is not one nps can compile for"):
        resolve("v9x:2x2")
    from nps.plan import decoder_config

    with pytest.raises(ConfigError, match="neither a preset"):
        decoder_config("no-such-model")


def test_the_command_plans_a_model_folder_locally_and_measures_it(tmp_path, capsys):
    """On this process's own CPU device: compiled, run three times, timed; JSON beside the text."""
    from nps.cli import main

    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf()))
    code = main(["plan", "--model", str(tmp_path), "--job", "dpo", "--topology", "local", "--batch", "2",
                 "--targets", "2", "--length", "32", "--lora-rank", "4", "--feature-dim", "8", "--pairs", "64",
                 "--options", "128", "--measure", "3", "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["fits"] and report["measured"]["step_s"] > 0 and report["measured"]["tokens_per_second"] > 0
    assert report["checks"]["no replicated work"] and report["checks"]["fits"]
    assert "measured: step" in out


@needs_libtpu
def test_a_program_that_does_not_fit_gets_the_largest_batch_that_does(tmp_path, capsys, monkeypatch):
    """Embedding 64 sequences of 8,192 tokens needs 16.3 GiB per v5e chip (attention's fp32 scores);
    the plan halves the batch until it fits, then interpolates and checks the largest that does."""
    from nps.cli import main

    for key, value in compile_only_environment("v5e:2x2").items():  # what the command sets, undone after
        monkeypatch.setenv(key, value)
    (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf()))
    code = main(["plan", "--model", str(tmp_path / "config.json"), "--job", "embed", "--topology", "v5e:2x2",
                 "--batch", "64", "--length", "8192", "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "plan.json").read_text())
    assert code == 1 and not report["fits"] and "DOES NOT FIT" in out
    assert report["memory"]["total"] > report["memory"]["capacity"]
    fitting = report["largest_fitting_batch"]
    assert fitting and 32 <= fitting < 64 and fitting % 4 == 0, report["advice"]
    assert not make_plan(Workload("embed", SMALL, batch=fitting + 4, length=8192), resolve("v5e:2x2"),
                         search=False).fits


# -- the table of docs/scale.md ------------------------------------------------------------------------
TABLE = [  # (name, model, job, topology, slices, workload fields, what it must reach)
    ("Qwen2.5-7B NP-DPO, v5e-16", "qwen2.5-7b", "np-dpo", "v5e:4x4", 1, {"batch": 16, "targets": 4}, 4096),
    ("Llama-3.1-8B NP-DPO, v5p-8", "llama-3.1-8b", "np-dpo", "v5p:2x2x2", 1, {"batch": 16, "targets": 8}, 16384),
    ("Qwen2.5-1.5B full fine-tuning (AdamW, fp32), v5e-8", "qwen2.5-1.5b", "full-ft", "v5e:2x4", 1,
     {"batch": 16, "length": 1024, "dtype": "float32"}, 0),
    ("Qwen2.5-7B steered generation, 4,096-token cache, batch 32, v5e-4", "qwen2.5-7b", "generate", "v5e:2x2", 1,
     {"batch": 32, "length": 512, "new_tokens": 3584}, 0),
    ("Qwen2.5-7B NP-DPO, 2 slices of v5e-16", "qwen2.5-7b", "np-dpo", "v5e:4x4", 2, {"batch": 32, "targets": 4},
     4096),
]


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_the_scale_table(row, capsys):
    name, model, job, topology, slices, fields, tokens = row
    plan = make_plan(Workload(job, PRESETS[model], **fields), resolve(topology, slices), model_name=model)
    with capsys.disabled():
        print(f"\n{name}\n{format_plan(plan)}")
    assert plan.fits and all(plan.checks.values()), format_plan(plan)
    assert plan.tokens_per_device >= tokens


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None or os.environ.get("CUDA_VISIBLE_DEVICES") != "-1",
                    reason="H100 rows: pip install 'nps[cuda12]' and run with CUDA_VISIBLE_DEVICES=-1 "
                           "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1")
@pytest.mark.parametrize("model", ["qwen2.5-7b", "llama-3.1-8b"])
def test_the_scale_table_on_eight_h100s(model, capsys):
    plan = make_plan(Workload("np-dpo", PRESETS[model], batch=16, targets=8), resolve("h100:8"), model_name=model)
    with capsys.disabled():
        print(f"\n{model} NP-DPO, 8 × H100\n{format_plan(plan)}")
    assert plan.fits and all(plan.checks.values()), format_plan(plan)
    assert plan.tokens_per_device >= 16384
