"""A plan: compile one job's program for a topology and say, per device, whether it fits and how fast
it can go (``nps plan``).

Per device, from the compiled program: memory (XLA's ``memory_analysis``: arguments, temporaries,
outputs not aliased to a donated argument), FLOPs, memory traffic and collectives
(``nps.plan.hlo``); held against the analytic estimates (``nps.plan.analytic``): compiled FLOPs ×
devices over the analytic count says whether any work is replicated (≤ 1.15), the memory
estimate whether the program holds what it should. The roofline step time is the larger of
FLOPs / peak and bytes / memory bandwidth; tokens/s and an MFU ceiling follow. On devices this
process owns (``--topology local``) the program also runs, and the measured step time stands
next to the roofline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from nps.errors import ConfigError
from nps.files import atomic_write_json
from nps.lm.decoder import LoRAConfig
from nps.plan import analytic, hlo, programs
from nps.plan.models import decoder_config
from nps.plan.programs import Workload
from nps.plan.topology import Target, compile_only_environment, resolve
from nps.train.mesh import make_mesh

GIB = 2**30
# Compiled FLOPs × devices within this factor of the analytic count: no work is replicated.
FLOPS_TOLERANCE = 1.15
# XLA's per-device memory within this factor of the analytic estimate.
MEMORY_TOLERANCE = 1.25
# XLA's argument bytes within this fraction of the shards' sizes (a TPU pads arrays to whole
# (8, 128) tiles: a pool's [N, 1] pair ids take 128 times their bytes).
ARGUMENT_TOLERANCE = 0.05
_OUT_OF_MEMORY = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


@dataclasses.dataclass
class Plan:
    """What ``make_plan`` found, per device unless named global; JSON-ready (``dataclasses.asdict``)."""

    model: str
    job: str
    topology: str
    device_kind: str
    devices: int
    hosts: int
    slices: int
    mesh: dict[str, int]
    batch: int
    sequences: int
    length: int
    remat: str
    tokens_per_step: int  # global
    tokens_per_device: float
    program: str
    compile_seconds: float
    fits: bool
    memory: dict[str, float]  # XLA: arguments, temporaries, outputs (not aliased), total, capacity
    analytic_memory: dict[str, float]  # weights, optimizer state, data, saved activations, temporaries, total
    flops: dict[str, float | None]  # compiled (per device), analytic (global), ratio
    roofline: dict[str, float | None]  # compute_s, memory_s, step_s, tokens_per_second, mfu_ceiling
    traffic_bytes: float | None
    collectives: dict[str, float]  # bytes per device per step, by kind
    slow_network: dict[str, float]  # the part of ``collectives`` whose groups span slices
    unknown_loops: list[str]
    largest_fitting_batch: int | None = None
    advice: str = ""
    measured: dict[str, float] | None = None
    flops_note: str = ""

    @property
    def checks(self) -> dict[str, bool]:
        """fits; no replicated work (FLOPs); arguments as laid out (XLA's argument bytes within 5 % of
        the shards' sizes); memory as estimated (XLA's total within 1.25× of the estimate) where the
        estimated working set is at least 1 GiB, else within the estimate (below that a TPU keeps a
        varying share of a block's working set in its on-chip vector memory, not in HBM)."""
        checks = {"fits": self.fits}
        if self.flops.get("ratio") is not None:
            checks["no replicated work"] = self.flops["ratio"] <= FLOPS_TOLERANCE
        laid_out = self.analytic_memory.get("arguments")
        if laid_out and self.flops.get("compiled") is not None:
            checks["arguments as laid out"] = abs(self.memory["arguments"] - laid_out) <= ARGUMENT_TOLERANCE * laid_out
        estimate, total = self.analytic_memory.get("total"), self.memory.get("total")
        if estimate and total:
            working = max((v for k, v in self.analytic_memory.items() if k.startswith("largest temporary")
                           or k == "a block's activations"), default=0.0)
            if working >= GIB:
                checks["memory as estimated"] = 1 / MEMORY_TOLERANCE <= total / estimate <= MEMORY_TOLERANCE
            else:
                checks["memory within the estimate"] = total <= MEMORY_TOLERANCE * estimate
        return checks


def default_mesh(workload: Workload, target: Target) -> dict[str, int]:
    """data over slices, everything else fsdp; generation: tensor parallelism over a host's devices
    where the heads divide (a decode step then reads each weight once, on one device)."""
    per_slice = target.size // target.slices
    if workload.job == "generate":
        config = workload.decoder
        tensor = max(t for t in range(1, per_slice + 1) if per_slice % t == 0 and config.num_kv_heads % t == 0
                     and config.num_heads % t == 0 and config.intermediate_size % t == 0)
        return {"data": target.slices, "fsdp": per_slice // tensor, "tensor": tensor}
    return {"data": target.slices, "fsdp": per_slice, "tensor": 1}


def parse_mesh(text: str, target: Target) -> dict[str, int]:
    """``data=2,fsdp=8,tensor=1`` (axes left out: 1; ``data`` may be left out: the rest of the devices)."""
    axes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in ("data", "fsdp", "tensor") or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--mesh={text!r}: each part is data=N, fsdp=N or tensor=N with N ≥ 1")
        axes[name] = int(value)
    fsdp, tensor = axes.get("fsdp", 1), axes.get("tensor", 1)
    data = axes.get("data", target.size // (fsdp * tensor))
    if data * fsdp * tensor != target.size:
        raise ConfigError(f"--mesh={text!r}: data × fsdp × tensor = {data * fsdp * tensor}, but {target.name} has "
                          f"{target.size} devices")
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def make_plan(workload: Workload, target: Target, mesh_axes: dict[str, int] | None = None, *, model_name: str = "",
              search: bool = True, measure_steps: int = 0) -> Plan:
    """Compile ``workload`` for ``target``; when it does not fit and ``search``, also find the largest
    batch that does. ``measure_steps`` > 0 runs the program that many times on a runnable target."""
    mesh_axes = mesh_axes or default_mesh(workload, target)
    mesh = make_mesh(**mesh_axes, devices=target.devices)
    plan = _compile(workload, target, mesh, mesh_axes, model_name)
    if not plan.fits and search:
        plan.largest_fitting_batch, plan.advice = _largest_fitting_batch(workload, target, mesh, mesh_axes, plan)
    if measure_steps and plan.fits:
        if not target.runnable:
            raise ConfigError(f"--measure runs the program, which needs devices of this process (--topology local), "
                              f"not {target.name}'s compile-only ones")
        plan.measured = _measure(workload, mesh, plan, measure_steps, target)
    return plan


def _compile(workload: Workload, target: Target, mesh, mesh_axes, model_name: str) -> Plan:
    program = programs.build(workload, mesh)
    start = time.perf_counter()
    compiled, temporaries, capacity = None, None, target.chip.memory if target.chip else None
    try:
        compiled = program.lowered.compile()
    except Exception as error:  # noqa: BLE001 - XLA's out-of-memory is the answer "does not fit"
        found = _OUT_OF_MEMORY.search(str(error))
        if not found:
            raise
        temporaries, capacity = _bytes(found.group(1), found.group(2)), _bytes(found.group(3), found.group(4))
    seconds = time.perf_counter() - start
    arguments = _device_bytes(program.args)
    memory: dict[str, float] = {"arguments": arguments}
    cost = None
    if compiled is not None:
        stats = compiled.memory_analysis()
        memory |= {"arguments": float(stats.argument_size_in_bytes), "temporaries": float(stats.temp_size_in_bytes),
                   "outputs": float(stats.output_size_in_bytes - stats.alias_size_in_bytes)}
        cost = hlo.analyse(compiled.as_text(), target.size)
    else:
        memory |= {"temporaries": temporaries, "outputs": 0.0}
    memory["total"] = memory["arguments"] + memory["temporaries"] + memory["outputs"]
    if capacity is not None:
        memory["capacity"] = float(capacity)
    fits = compiled is not None and (capacity is None or memory["total"] <= capacity)
    analytic_memory = _analytic_memory(program)
    flops: dict[str, float | None] = {"compiled": None, "analytic": program.flops, "ratio": None}
    roofline: dict[str, float | None] = {}
    collectives, slow = {}, {}
    if cost is not None:
        flops["compiled"] = cost.flops
        flops["ratio"] = cost.flops * target.size / program.flops if program.flops else None
        roofline = _roofline(cost, target, program, workload)
        collectives, slow = cost.collective_bytes(), cost.collective_bytes("data-centre")
    return Plan(
        model=model_name, job=workload.job, topology=target.name, device_kind=target.device_kind, devices=target.size,
        hosts=target.hosts, slices=target.slices, mesh=dict(mesh_axes), batch=workload.batch,
        sequences=workload.sequences, length=workload.length, remat=workload.remat,
        tokens_per_step=workload.tokens, tokens_per_device=workload.tokens / target.size, program=program.name,
        compile_seconds=seconds, fits=fits, memory=memory, analytic_memory=analytic_memory, flops=flops,
        roofline=roofline, traffic_bytes=None if cost is None else cost.bytes_accessed, collectives=collectives,
        slow_network=slow, unknown_loops=[] if cost is None else cost.unknown_loops, flops_note=program.flops_note)


def _bytes(number: str, unit: str) -> float:
    return float(number) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]


def _device_bytes(tree: Any) -> float:
    """Bytes one device holds of abstract arrays with shardings (the largest shard, per leaf)."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * _itemsize(leaf.dtype)
    return total


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a threefry key: two uint32
    return jnp.dtype(dtype).itemsize


def _analytic_memory(program: programs.Program) -> dict[str, float]:
    """Arguments by what they are (from their shardings) and the program's analytic working set."""
    args = program.args
    parts: dict[str, float] = {}
    if program.name.startswith("fit"):
        state, frozen, pool = args[0], args[1], args[2]
        parts["weights (frozen)"] = _device_bytes(frozen)
        parts["trainable + optimizer state"] = _device_bytes(state)
        parts["data"] = _device_bytes(pool)
        parts["gradients + updates"] = 2 * _device_bytes(state.params)
    elif program.name.startswith("train_language_model"):
        parts["weights + optimizer state"] = _device_bytes(args[0])
        parts["data"] = _device_bytes(args[2:4])
        parts["gradients + updates"] = 2 * _device_bytes(args[0].weights)
    else:
        parts["weights"] = _device_bytes(args[0]) - program.unread_bytes
        parts["inputs"] = _device_bytes(args[1:])
    arguments = _device_bytes(args) - program.unread_bytes
    working = dict(program.memory)
    if "block backward" in working:  # the larger of a block's backward and the head's chunk
        largest = max(("block backward", "head chunk"), key=lambda k: working[k])
        parts["saved activations"] = working["saved activations"]
        parts[f"largest temporary ({largest})"] = working[largest]
    else:
        parts |= working
    parts["total"] = sum(parts.values())
    parts["arguments"] = arguments  # what the parts above that are arguments add up to (not again in the total)
    return parts


def _roofline(cost: hlo.ProgramCost, target: Target, program: programs.Program, workload: Workload) -> dict:
    chip = target.chip
    if chip is None:
        return {}
    compute = cost.flops / chip.peak_flops
    memory = cost.bytes_accessed / chip.memory_bandwidth if chip.memory_bandwidth else None
    step = max(compute, memory or 0.0)
    roofline = {"compute_s": compute, "memory_s": memory, "step_s": step}
    on_chip = sum(bytes_ for kind, bytes_ in cost.collective_bytes().items())
    if chip.interconnect_bandwidth:
        roofline["interconnect_s"] = on_chip / chip.interconnect_bandwidth
    if workload.job == "generate":  # a decode step reads every weight and the cache once per token
        weights = _device_bytes(program.args[0])
        step_bytes = weights + program.memory["KV cache"]
        decode = max(step_bytes / chip.memory_bandwidth if chip.memory_bandwidth else 0.0,
                     analytic_decode_flops(workload) / target.size / chip.peak_flops)
        roofline |= {"decode_step_s": decode, "tokens_per_second": workload.batch / decode}
        return roofline
    if workload.tokens:
        roofline["tokens_per_second"] = workload.tokens / step
    model_flops = program.model_flops or program.flops
    roofline["mfu_ceiling"] = model_flops / (target.size * chip.peak_flops * step) if step else None
    return roofline


def analytic_decode_flops(workload: Workload) -> float:
    """Global FLOPs of one decode step: a token per sequence, attending over the whole cache."""
    cache = workload.length + workload.new_tokens
    return analytic.forward_flops(workload.decoder, workload.lora, workload.batch, 1, cache, 1)


def _largest_fitting_batch(workload: Workload, target: Target, mesh, mesh_axes, failed: Plan) -> tuple[int | None, str]:
    """Halve the batch (in whole multiples of the batch shards) until the program fits, then
    interpolate memory linearly in the batch between that and the last failure and check the
    prediction by compiling it."""
    shards = mesh_axes["data"] * mesh_axes["fsdp"] if workload.job != "generate" else 1
    low, high, high_total = None, workload.batch, failed.memory["total"]
    batch = workload.batch
    while batch > shards:
        batch = max(shards, (batch // 2) // shards * shards)
        trial = _compile(dataclasses.replace(workload, batch=batch), target, mesh, mesh_axes, failed.model)
        if trial.fits:
            low, low_total = batch, trial.memory["total"]
            break
        high, high_total = batch, trial.memory["total"]
    if low is None:
        need = failed.analytic_memory.get("weights (frozen)", 0) + failed.analytic_memory.get(
            "trainable + optimizer state", failed.analytic_memory.get("weights + optimizer state", 0))
        return None, (f"does not fit at the smallest batch ({batch}); try --remat full, a shorter --length, or more "
                      f"devices (weights and optimizer state alone take {need / GIB:.2f} GiB per device here)")
    capacity = failed.memory["capacity"]
    per_batch = (high_total - low_total) / (high - low)
    predicted = low + int((capacity - low_total) / per_batch) // shards * shards if per_batch > 0 else low
    predicted = min(max(predicted, low), high - shards)
    while predicted > low:
        trial = _compile(dataclasses.replace(workload, batch=predicted), target, mesh, mesh_axes, failed.model)
        if trial.fits:
            return predicted, f"the largest batch that fits is {predicted}"
        predicted -= shards
    return low, f"the largest batch that fits is {low}"


def _measure(workload: Workload, mesh, plan: Plan, steps: int, target: Target) -> dict[str, float]:
    """Run the compiled program ``steps`` times on zeros (one call first, to warm up) and time it."""
    program = programs.build(workload, mesh)
    compiled = program.lowered.compile()
    args = jax.tree.map(_zeros_like, program.args)
    outputs = compiled(*args)
    jax.block_until_ready(outputs)
    args = program.next_args(args, outputs)
    start = time.perf_counter()
    for _ in range(steps):
        outputs = compiled(*args)
        args = program.next_args(args, outputs)
    jax.block_until_ready(outputs)
    step = (time.perf_counter() - start) / steps
    measured = {"step_s": step}
    if workload.tokens:
        measured["tokens_per_second"] = workload.tokens / step
    if target.chip is not None:
        measured["mfu"] = (program.model_flops or program.flops) / (target.size * target.chip.peak_flops * step)
    if plan.roofline.get("step_s"):
        measured["measured_over_roofline"] = step / plan.roofline["step_s"]
    return measured


def _zeros_like(leaf: jax.ShapeDtypeStruct):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.device_put(jax.random.key(0), leaf.sharding)
    return jax.jit(lambda: jnp.zeros(leaf.shape, leaf.dtype), out_shardings=leaf.sharding)()


def format_plan(plan: Plan) -> str:
    """The plan as a person reads it."""
    gib = _size
    mesh = " × ".join(f"{name} {size}" for name, size in plan.mesh.items())
    lines = [
        f"{plan.model} · {plan.job} · {plan.topology}: {plan.devices} × {plan.device_kind} ({plan.hosts} hosts"
        f"{f', {plan.slices} slices' if plan.slices > 1 else ''}), mesh {mesh}",
        f"program: {plan.program}; batch {plan.batch} ({plan.sequences} sequences × {plan.length} tokens"
        f"{f', {plan.tokens_per_device:,.0f} tokens per device' if plan.tokens_per_step else ''}), remat {plan.remat}; "
        f"compiled in {plan.compile_seconds:.1f} s",
        "",
        "memory per device            compiled (XLA)     estimate",
    ]
    estimate = dict(plan.analytic_memory)
    rows = [("arguments", plan.memory.get("arguments")), ("temporaries", plan.memory.get("temporaries")),
            ("outputs (not donated)", plan.memory.get("outputs"))]
    for name, value in rows:
        lines.append(f"  {name:<27} {gib(value):>14}")
    for name, value in estimate.items():
        if name not in ("total", "arguments"):
            lines.append(f"  {'':<27} {'':>14}     {name}: {gib(value)}")
    capacity = plan.memory.get("capacity")
    lines.append(f"  {'total':<27} {gib(plan.memory.get('total')):>14}     {gib(estimate.get('total'))}"
                 f"   of {gib(capacity)}: {'FITS' if plan.fits else 'DOES NOT FIT'}")
    if plan.largest_fitting_batch is not None or plan.advice:
        lines.append(f"  → {plan.advice}")
    if plan.flops.get("compiled") is not None:
        lines += ["", f"FLOPs per step: {plan.flops['compiled']:.3e} per device (compiled); "
                      f"× {plan.devices} devices / analytic {plan.flops['analytic']:.3e} = {plan.flops['ratio']:.3f}"
                      f" ({plan.flops_note})"]
    roofline = plan.roofline
    if roofline:
        parts = [f"compute {roofline['compute_s'] * 1e3:.1f} ms"]
        if roofline.get("memory_s") is not None:
            parts.append(f"memory traffic {roofline['memory_s'] * 1e3:.1f} ms (an upper bound)")
        line = "roofline: " + ", ".join(parts)
        if "decode_step_s" in roofline:
            line += (f"; a decode step {roofline['decode_step_s'] * 1e3:.2f} ms (weights and cache read once): "
                     f"{roofline['tokens_per_second']:,.0f} tokens/s")
        else:
            line += f" → step {roofline['step_s'] * 1e3:.1f} ms"
            if roofline.get("tokens_per_second"):
                line += f", {roofline['tokens_per_second']:,.0f} tokens/s"
            if roofline.get("mfu_ceiling") is not None:
                line += f", MFU ceiling {roofline['mfu_ceiling']:.1%}"
        lines.append(line)
        if roofline.get("interconnect_s") is not None:
            lines.append(f"collectives: {_sizes(plan.collectives)} per device per step "
                         f"({roofline['interconnect_s'] * 1e3:.1f} ms at the chip's interconnect rate if not overlapped)")
    elif plan.collectives:
        lines.append(f"collectives: {_sizes(plan.collectives)} per device per step")
    if plan.slices > 1:
        lines.append(f"across slices (data-centre network): {_sizes(plan.slow_network) or 'nothing'} per device per step")
    if plan.measured:
        measured = plan.measured
        text = f"measured: step {measured['step_s'] * 1e3:.1f} ms"
        if "tokens_per_second" in measured:
            text += f", {measured['tokens_per_second']:,.0f} tokens/s"
        if "mfu" in measured:
            text += f", MFU {measured['mfu']:.1%}"
        if "measured_over_roofline" in measured:
            text += f"; measured / roofline = {measured['measured_over_roofline']:.2f}"
        lines.append(text)
    checks = plan.checks
    lines += ["", "checks: " + ", ".join(f"{name} {'✓' if ok else '✗'}" for name, ok in checks.items())]
    return "\n".join(lines)


def _size(count: float | None) -> str:
    """Bytes in the largest binary unit that leaves at least 1."""
    if count is None:
        return "—"
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"


def _sizes(collectives: dict[str, float]) -> str:
    return ", ".join(f"{kind} {size / 1e9:.2f} GB" for kind, size in sorted(collectives.items(), key=lambda kv: -kv[1]))


def plan_command(model: str = "qwen2.5-7b", job: str = "np-dpo", topology: str = "v5e:4x4", *, num_slices: int = 1,
                 mesh: str = "", batch: int = 16, targets: int = 4, context: int = 6, length: int = 512,
                 new_tokens: int = 3584, remat: str = "full", dtype: str = "bfloat16", lora_rank: int = 128,
                 lora_targets: str = "q,v", feature_dim: int = 4096, pairs: int = 28763, options: int = 71890,
                 no_search: bool = False, measure: int = 0, json_path: str | None = None, echo=print) -> int:
    """`nps plan`, with the command's flags: the plan of ``job`` on ``model`` for ``topology``, echoed as a
    person reads it (``json_path``: also written as JSON there; "-": echoed as JSON instead); 0 if it
    fits, 1 if not."""
    for key, value in compile_only_environment(topology).items():  # before JAX starts its backends
        os.environ.setdefault(key, value)
    name, decoder = decoder_config(model)
    lora = LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank, targets=tuple(lora_targets.split(",")))
    workload = Workload(job, decoder, dtype, batch, targets, context, length, new_tokens, remat, lora, feature_dim,
                        pairs=pairs, options=options)
    target = resolve(topology, num_slices)
    plan = make_plan(workload, target, parse_mesh(mesh, target) if mesh else None, model_name=name,
                     search=not no_search, measure_steps=measure)
    report = dataclasses.asdict(plan) | {"checks": plan.checks}
    if json_path == "-":
        echo(json.dumps(report, indent=2))
    else:
        echo(format_plan(plan))
        if json_path:
            atomic_write_json(Path(json_path), report)
    return 0 if plan.fits else 1
