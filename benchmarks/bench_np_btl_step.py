"""How close NP-BTL's training step (the synthetic task's, as `nps reproduce synthetic` trains it) comes to
this machine's matmul rate, and where the rest of its time goes.

    python benchmarks/bench_np_btl_step.py [--rounds 5] [--chunks 5] [--profiles 3]

1. The matmul rate: jitted fp32 matmuls, best of several calls: a large square one and the largest shapes
   of the step (its target encoder's and decoder's 1,280 × 256 × 256 layers, its attention's
   640 × 256 × 768 q, k, v projection).
2. The step: its matmul FLOPs counted from its jaxpr (``nps.train.logging.matmul_flops``, what ``fit``'s MFU
   uses), and its rate in ``fit``'s compiled 20-step scans (validation apart, compilation excluded): FLOP/s
   achieved, as a share of the matmul rates above; then validation (512 tasks, once per 20 steps) and the
   episode sampler alone.
3. A ``jax.profiler`` trace of one 20-step scan, its XLA thunks (kernels) summed by kind: the step's matmuls
   (forward and backward), its other forward and backward work, and the rest (the episode sampler, Adam,
   the metrics); and how much of the scan's wall-clock no kernel was running.

Every measurement runs once per round, the rounds one after another, and the best time of each is kept,
so that a burst of other work on a shared machine spoils a round, not the result; the CPU that other
processes used during the rounds is printed with it.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.synthetic import two_user_pools
from nps.models.reward import SYNTHETIC_NP_BTL, build_reward_model
from nps.train.logging import matmul_flops
from nps.train.loop import TrainConfig, TrainProgram, _train_chunk, _validate

CHUNK = TrainConfig().eval_every  # fit's scan length: 20 steps between validations


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (all cores) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """The CPU that other processes used while the block ran, in cores (the machine's busy time less ours)."""

    def __enter__(self):
        self.busy, self.own, self.start = machine_busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        own = time.process_time() - self.own
        self.cores = max(machine_busy_seconds() - self.busy - own, 0.0) / (time.perf_counter() - self.start)


def timings(fn, calls: int) -> list[float]:
    """Wall-clock of ``calls`` calls of ``fn()``, each blocked until ready."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def matmul(fn, a_shape, b_shape):
    """A jitted fp32 matmul ``fn(a, b)`` of operands shaped ``a_shape``, ``b_shape``, ready to call."""
    a = jax.random.normal(jax.random.key(0), a_shape, jnp.float32)
    b = jax.random.normal(jax.random.key(1), b_shape, jnp.float32)
    compiled = jax.jit(fn)
    return lambda: compiled(a, b)


def hlo_instructions(hlo: str) -> dict[str, dict]:
    """Each instruction of a compiled module's text: its opcode, its op_name, and whether it does a matmul
    (a dot, or a fusion whose computation holds one)."""
    computations, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    instructions = {}
    for lines in computations.values():
        for line in lines:
            found = re.match(r"^\s+(?:ROOT )?%(\S+) = \S+(?: \S+)*? ([a-z][\w-]*)\(", line)
            if not found:
                continue
            name, opcode = found.groups()
            called = re.search(r"calls=%([\w.-]+)", line)
            body = "\n".join(computations.get(called.group(1), [])) if called else ""
            op_name = re.search(r'op_name="([^"]*)"', line)
            instructions[name] = {
                "opcode": opcode,
                "op_name": op_name.group(1) if op_name else "",
                "matmul": opcode == "dot" or (opcode == "fusion" and " dot(" in body),
            }
    return instructions


def kind_of(instruction: dict) -> str:
    op_name = instruction["op_name"]
    part = "backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name else None
    if part is None:
        return "other: episode sampler, Adam, metrics"
    return f"{part}: {'matmuls' if instruction['matmul'] else 'the rest (elementwise, reductions, copies)'}"


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals given in µs, in seconds."""
    total, reach = 0.0, float("-inf")
    for begin, finish in sorted(intervals):
        if finish > reach:
            total += finish - max(begin, reach)
            reach = finish
    return total / 1e6


def profile_chunk(run, args, instructions: dict, steps: int) -> dict:
    """Kernel time per step from a perfetto trace of one call of ``run``: summed by kind, and the time during
    which some matmul ran, only other kernels ran, and none ran (kernels on different threads overlap)."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(run(*args))
            wall = time.perf_counter() - start
        trace = json.load(gzip.open(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_kind, kernels, matmuls = collections.Counter(), [], []
    for event in events:
        instruction = instructions.get(event.get("name"))
        if event.get("ph") != "X" or instruction is None or instruction["opcode"] in ("while", "call", "conditional"):
            continue  # only kernels: control flow's events hold its bodies' kernels
        by_kind[kind_of(instruction)] += event["dur"] / 1e6
        kernels.append((event["ts"], event["ts"] + event["dur"]))
        if instruction["matmul"]:
            matmuls.append(kernels[-1])
    busy, matmul = union_seconds(kernels), union_seconds(matmuls)
    return {"wall": wall / steps, "kernels": len(kernels) / steps, "matmul": matmul / steps,
            "others_only": (busy - matmul) / steps, "idle": (wall - busy) / steps,
            "by_kind": {k: v / steps for k, v in by_kind.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every measurement; the best is kept")
    parser.add_argument("--chunks", type=int, default=5, help="20-step scans timed per round")
    parser.add_argument("--profiles", type=int, default=3, help="profiled scans; the fastest is shown (0: none)")
    args = parser.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    print(f"machine: {os.cpu_count()} cores ({cpu}), jax {jax.__version__} on {jax.default_backend()}; "
          f"load {Path('/proc/loadavg').read_text().split()[0]}")

    pools, spec, config = two_user_pools(), EpisodeSpec(), TrainConfig()
    program, frozen, params = TrainProgram.of(build_reward_model(1, SYNTHETIC_NP_BTL, 0), spec, config, None)
    state = program.initial_state(params)
    data_key, model_key, val_key = jax.random.split(jax.random.key(config.seed), 3)
    flops = program.step_flops(state, frozen, pools["train"], data_key, model_key)
    run = _train_chunk.lower(state, frozen, pools["train"], data_key, model_key, length=CHUNK,
                             **program.static()).compile()
    holder = [state]  # the train state, donated by every call as in fit

    def chunk():
        holder[0], metrics = run(holder[0], frozen, pools["train"], data_key, model_key)
        return metrics

    val_episodes = sample_episodes(val_key, pools["val"], spec, config.val_tasks)
    few_episodes = sample_episodes(val_key, pools["val"], spec, config.batch_size)
    validate = functools.partial(_validate, **program.validation_static())
    val_flops = matmul_flops(validate, state, frozen, val_episodes, val_key)
    few_flops = matmul_flops(validate, state, frozen, few_episodes, val_key)

    def validation(episodes):
        holder[0], metrics = validate(holder[0], frozen, episodes, val_key)
        return metrics

    @jax.jit
    def sampler_only(key, pool):
        def body(total, i):
            episodes = sample_episodes(jax.random.fold_in(key, i), pool, spec, config.batch_size)
            return total + sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(episodes)), None
        return jax.lax.scan(body, 0.0, jnp.arange(CHUNK))[0]

    # name: (function, calls per round, FLOPs per call)
    items = {"2048 × 2048 @ 2048 × 2048": (matmul(jnp.matmul, (2048, 2048), (2048, 2048)), 3, 2 * 2048**3)}
    for label, (m, k, n) in (("1280 × 256 × 256 (target encoder, decoder)", (1280, 256, 256)),
                             ("640 × 256 × 768 (attention q, k, v)", (640, 256, 768))):
        for layout, fn, a, b in (("x @ W", lambda a, b: a @ b, (m, k), (k, n)),
                                 ("g @ Wᵀ", lambda a, b: a @ b.T, (m, k), (n, k)),
                                 ("xᵀ @ g", lambda a, b: a.T @ b, (m, k), (m, n))):
            items[f"{label}, {layout}"] = (matmul(fn, a, b), 40, 2 * m * k * n)
    items["chunk"] = (chunk, args.chunks, CHUNK * flops)
    items["validation"] = (lambda: validation(val_episodes), args.chunks, val_flops)
    items["validation, 64 tasks"] = (lambda: validation(few_episodes), 4 * args.chunks, few_flops)
    items["sampler"] = (lambda: sampler_only(data_key, pools["train"]), args.chunks, 0)
    for fn, _, _ in items.values():
        timings(fn, 2)  # compile and warm up
    best = {name: float("inf") for name in items}
    chunk_times, others = [], []
    for _ in range(args.rounds):
        with OtherLoad() as other:
            for name, (fn, calls, _) in items.items():
                times = timings(fn, calls)
                best[name] = min(best[name], *times)
                if name == "chunk":
                    chunk_times += times
        others.append(other.cores)
    print(f"best of {args.rounds} rounds; other processes used {min(others):.2f}–{max(others):.2f} cores during them")

    rate = {name: items[name][2] / best[name] / 1e9 for name in items}
    print("\nmatmul rate (fp32, jitted, best call):")
    for name in list(items)[:7]:
        print(f"  {name:<58}{rate[name]:8.1f} GFLOP/s")
    square, layer = rate["2048 × 2048 @ 2048 × 2048"], rate["1280 × 256 × 256 (target encoder, decoder), x @ W"]
    step, median = best["chunk"] / CHUNK, statistics.median(chunk_times) / CHUNK
    print(f"\nNP-BTL training step (batch {config.batch_size} tasks, N^T {spec.num_targets}, N^C ≤ "
          f"{spec.max_context}, hidden 256): {flops / 1e9:.3f} GFLOP of matmuls (nps.train.logging.matmul_flops)")
    print(f"  fit's {CHUNK}-step scan: {1 / step:.1f} steps/s best, {1 / median:.1f} median ({1e3 * step:.2f} ms/step) "
          f"= {rate['chunk']:.1f} GFLOP/s: {100 * rate['chunk'] / square:.0f} % of the square matmul's rate, "
          f"{100 * rate['chunk'] / layer:.0f} % of its own largest layer's")
    print(f"  at those two rates its matmuls alone would take {1e3 * flops / square / 1e9:.2f} / "
          f"{1e3 * flops / layer / 1e9:.2f} ms: a bound of {square * 1e9 / flops:.0f} / {layer * 1e9 / flops:.0f} "
          "steps/s")
    print(f"  validation ({config.val_tasks} tasks, once per {CHUNK} steps): {1e3 * best['validation']:.2f} ms = "
          f"{1e3 * best['validation'] / CHUNK:.2f} ms/step; fit's steps/s with it: "
          f"{CHUNK / (best['chunk'] + best['validation']):.1f}")
    print(f"    its forward pass: {val_flops / 1e9:.2f} GFLOP at {rate['validation']:.1f} GFLOP/s; the same on "
          f"{config.batch_size} tasks: {rate['validation, 64 tasks']:.1f} GFLOP/s")
    print(f"  the episode sampler alone: {1e3 * best['sampler'] / CHUNK:.2f} ms/step")

    profiles, instructions = [], hlo_instructions(run.as_text())
    for _ in range(args.profiles):
        with OtherLoad() as other:
            profile = profile_chunk(run, (holder[0], frozen, pools["train"], data_key, model_key), instructions,
                                    CHUNK)
        profiles.append(profile | {"other": other.cores})
        holder[0] = program.initial_state(params)  # the state was donated to the profiled call
    if profiles:
        profile = min(profiles, key=lambda p: p["wall"])
        print(f"\nprofile of one {CHUNK}-step scan (jax.profiler, the fastest of {len(profiles)}; other processes "
              f"{profile['other']:.2f} cores), per step: {profile['kernels']:.0f} kernels, wall-clock "
              f"{1e3 * profile['wall']:.2f} ms under the profiler ({1e3 * step:.2f} ms without)")
        print(f"  some matmul running      {1e3 * profile['matmul']:7.2f} ms (their FLOPs at the square matmul's rate: "
              f"{1e3 * flops / square / 1e9:.2f} ms)")
        print(f"  only other kernels       {1e3 * profile['others_only']:7.2f} ms")
        print(f"  no kernel running        {1e3 * profile['idle']:7.2f} ms")
        print("  kernel time by kind (summed over threads: independent kernels run side by side on the two cores):")
        kernels = sum(profile["by_kind"].values())
        for kind, seconds in sorted(profile["by_kind"].items()):
            print(f"    {kind:<62}{1e3 * seconds:7.2f} ms {100 * seconds / kernels:4.0f} %")


if __name__ == "__main__":
    main()
