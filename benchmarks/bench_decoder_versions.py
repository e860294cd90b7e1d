"""Decoder implementations side by side, in one process: this checkout's against other ``decoder.py`` files.

A refactor of ``nps/lm/decoder.py`` is judged against the code it replaces on the same
machine and under the same load: each other file is imported under its own module name
(it uses this checkout's ``nps`` for everything else), every variant's jitted step is
compiled first, then the variants run in turn ``--repeats`` times; the best and the
median time of each are printed with their ratio to the first file given.

    git worktree add /tmp/nps-main main
    python benchmarks/bench_decoder_versions.py /tmp/nps-main/nps/lm/decoder.py [--bench generate train dpo]

Benchmarks (CPU-sized): ``generate``: greedy decoding, Qwen2-shaped 2 layers, hidden 256, vocab 32,000,
batch 8, 16-token prompts, 128 new tokens (bench_generate.py's model); ``train``: value-and-grad of
the next-token loss w.r.t. LoRA r 128 on q, v, bf16 base, 2 layers, hidden 128, vocab 1,000, 4 × 256
tokens (bench_lm_train_step.py --tiny); ``dpo``: one NP-DPO step with AdamW, 4 layers, hidden 256,
vocab 32,000, fp32, 2 tasks × 9 targets × 2 × 128 tokens (bench_dpo_step.py's default).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nps.lm.decoder
from nps.layers import BaseParam
from nps.lm.generate import SamplingConfig, generate
from nps.train.next_token import next_token_loss


def load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def qwen2(m, **fields):
    base = dict(model_type="qwen2", vocab_size=32000, hidden_size=256, intermediate_size=704, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True)
    return m.DecoderConfig(**(base | fields))


def generate_step(m):
    model = m.Decoder(qwen2(m), rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(1, 32000, (8, 16))
    sampling = SamplingConfig(max_new_tokens=128)
    return lambda: generate(model, prompts, sampling=sampling).tokens, 8 * 128


def train_step(m):
    config = qwen2(m, vocab_size=1000, hidden_size=128, intermediate_size=256, head_dim=32)
    model = m.Decoder(config, lora=m.LoRAConfig(rank=128, targets=("q", "v")), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, frozen, params = nnx.split(model, BaseParam, nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (4, 256), 0, 1000)
    mask = jnp.ones((4, 256), bool)
    step = jax.jit(jax.value_and_grad(lambda p, f, t, k: next_token_loss(nnx.merge(graphdef, f, p), t, k)))
    return lambda: step(params, frozen, tokens, mask), 4 * 256


def dpo_step(m):
    from bench_dpo_step import make_pool

    from nps.data.episodes import EpisodeSpec, sample_episodes
    from nps.encoder import EncoderConfig
    from nps.models.policy import PolicyConfig, SteerablePolicy

    config = qwen2(m, num_layers=4, max_position_embeddings=128)
    episodes = sample_episodes(jax.random.key(0), make_pool(config, 128, 4096, pairs=72),
                               EpisodeSpec(num_targets=9, min_context=5, max_context=5), 2)
    policy_config = PolicyConfig(kind="np", lora=m.LoRAConfig(rank=128, alpha=256.0),
                                 encoder=EncoderConfig(hidden_dim=256, latent_dim=256, attention_dropout=0.0))
    policy = SteerablePolicy(m.Decoder(config, rngs=nnx.Rngs(0)), 4096, policy_config, rngs=nnx.Rngs(1))
    graphdef, frozen, params = nnx.split(policy, BaseParam, nnx.Param)
    optimizer = optax.adamw(1e-5)

    @jax.jit
    def step(params, opt_state):
        loss = lambda p: nnx.merge(graphdef, frozen, p).objective(episodes, jax.random.key(0))[0]  # noqa: E731
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = optimizer.init(params)
    return lambda: step(params, opt_state), 2 * 9 * 2 * 128


BENCHES = {"generate": generate_step, "train": train_step, "dpo": dpo_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("others", nargs="+", help="decoder.py files to compare with this checkout's")
    parser.add_argument("--bench", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    variants = {path: load(f"decoder_{index}", path) for index, path in enumerate(args.others)}
    variants["this checkout"] = nps.lm.decoder
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.repeats} alternating runs each")
    for bench in args.bench:
        steps = {}
        for name, module in variants.items():
            run, tokens = BENCHES[bench](module)
            jax.block_until_ready(run())  # compile
            steps[name] = run
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, run in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(run())
                times[name].append(time.perf_counter() - start)
        first = statistics.median(times[args.others[0]])
        print(f"{bench}:")
        for name, seconds in times.items():
            median = statistics.median(seconds)
            print(f"  {name:40s} best {min(seconds) * 1e3:8.1f} ms, median {median * 1e3:8.1f} ms "
                  f"({tokens / median:8.0f} tokens/s), median / first {median / first:.3f}x")


if __name__ == "__main__":
    main()
