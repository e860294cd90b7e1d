"""The tests' XLA settings (tests/conftest.py) against XLA's defaults and against -O0 alone: the
compile time of programs the suite compiles often, a 40-step NP-BTL fit end to end, and its steps/s.

XLA reads its flags once per process, so each setting runs in a fresh child process, with no
persistent compilation cache; the ratios are against the first setting (-O0 alone), measured by
the same invocation. Usage:

    python benchmarks/bench_test_compile_flags.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

SETTINGS = {
    "-O0 alone": ["--xla_backend_optimization_level=0"],
    "XLA's defaults (-O2)": [],
    "-O0, elemental emitters": ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"],
    "-O2, elemental emitters": ["--xla_cpu_use_fusion_emitters=false"],
    "-O2, elemental emitters, unsplit code generation": ["--xla_cpu_use_fusion_emitters=false",
                                                         "--xla_cpu_parallel_codegen_split_count=1"],
    "the tests' settings": ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                            "--xla_cpu_parallel_codegen_split_count=1"],
}

CHILD = textwrap.dedent(
    """
    import json, tempfile, time
    from pathlib import Path
    import jax, jax.numpy as jnp
    from flax import nnx
    from nps.data.episodes import EpisodeSpec, sample_episodes
    from nps.data.synthetic import two_user_pools
    from nps.lm.loading import from_pretrained
    from nps.lm.tiny import write_tiny_model
    from nps.models import SYNTHETIC_NP_BTL, build_reward_model
    from nps.train import TrainConfig, fit

    seconds = {}
    def compile_seconds(name, function, *args):
        lowered = jax.jit(function).lower(*args)
        start = time.perf_counter()
        lowered.compile()
        seconds[name] = time.perf_counter() - start

    directory = Path(tempfile.mkdtemp()) / "tiny"
    write_tiny_model(directory, "qwen2", seed=0)
    graphdef, state = nnx.split(from_pretrained(directory, tokenizer=False).model)
    loss = lambda state, tokens: nnx.merge(graphdef, state)(tokens).mean()
    compile_seconds("tiny decoder: loss and gradient", jax.value_and_grad(loss), state, jnp.ones((4, 12), jnp.int32))
    pools, spec = two_user_pools(2000, 0, 0.5), EpisodeSpec()
    compile_seconds("episode sampler (64 tasks)", lambda key, pool: sample_episodes(key, pool, spec, 64),
                    jax.random.key(0), pools["train"])
    start = time.perf_counter()
    model = build_reward_model(1, SYNTHETIC_NP_BTL, seed=0)
    result = fit(model, pools["train"], pools["val"], spec, TrainConfig(steps=40, eval_every=20, val_tasks=64),
                 progress=False)
    seconds["NP-BTL: build + 40-step fit"] = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "steps_per_second": result.steps_per_second}))
    """
)


def measure(flags: list[str]) -> dict:
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="child processes per setting (the fastest is kept)")
    args = parser.parse_args()
    results = {}
    for name, flags in SETTINGS.items():
        runs = [measure(flags) for _ in range(args.repeats)]
        best = {key: min(run["seconds"][key] for run in runs) for key in runs[0]["seconds"]}
        results[name] = best | {"steps/s": max(run["steps_per_second"] for run in runs)}
    baseline = results["-O0 alone"]
    for name, values in results.items():
        cells = ", ".join(f"{key} {value:.2f}" + ("" if key == "steps/s" else " s") +
                          f" ({value / baseline[key]:.2f}x)" for key, value in values.items())
        print(f"{name}: {cells}")


if __name__ == "__main__":
    main()
