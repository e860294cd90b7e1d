"""The cost of conditioning: one NP-DPO training step against one plain LoRA-DPO step.

Same base model, same batch (tasks × targets × {chosen, rejected} sequences), same LoRA;
NP-DPO adds the context encoder over the context pairs' features, the FiLM hypernetwork
and per-example modulation of every block. Each variant also runs with the reference
log-probabilities computed on the fly (a second, gradient-free forward of the base with
adapters off) instead of precomputed. Reported: step time (best of --steps, compilation
excluded and timed separately) and XLA's memory for the step (arguments + temporaries,
from the compiled program's memory analysis: comparable across variants on any backend).

    python benchmarks/bench_dpo_step.py [--layers 4] [--hidden 256] [--vocab 32000] [--seq 128]
        [--tasks 2] [--targets 9] [--context 5]
    python benchmarks/bench_dpo_step.py --qwen-1.5b --seq 512 --tasks 8 --bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.pairs import OptionPairPool, PairPool, PolicyOptions
from nps.encoder import EncoderConfig
from nps.layers import BaseParam
from nps.lm import Decoder, DecoderConfig, LoRAConfig
from nps.models.policy import PolicyConfig, SteerablePolicy

QWEN_1P5B = DecoderConfig(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
    num_kv_heads=2, head_dim=128, rope_theta=1e6, tie_word_embeddings=True,
)


def make_pool(config: DecoderConfig, seq: int, feature_dim: int, pairs: int, seed: int = 0) -> OptionPairPool:
    rng = np.random.default_rng(seed)
    count = 2 * pairs
    tokens = rng.integers(1, config.vocab_size, (count, seq)).astype(np.int32)
    response = np.arange(seq)[None] >= seq // 4  # a quarter prompt, the rest response
    options = PolicyOptions(
        tokens=jnp.asarray(tokens), token_mask=jnp.ones((count, seq), bool),
        response_mask=jnp.asarray(np.broadcast_to(response, (count, seq))),
        features=jnp.asarray(rng.normal(size=(count, feature_dim)), jnp.float32),
        reference_log_prob=jnp.asarray(rng.normal(size=count) - 100.0, jnp.float32),
    )
    utility = rng.normal(size=(count, 2)).astype(np.float32)
    pool = PairPool(jnp.arange(pairs)[:, None], jnp.arange(pairs, count)[:, None],
                    jnp.asarray(utility[:pairs]), jnp.asarray(utility[pairs:]))
    return OptionPairPool(pool, options)


def measure(decoder_config, dtype, kind, reference, episodes, args):
    config = PolicyConfig(kind=kind, reference=reference, lora=LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank),
                          encoder=EncoderConfig(hidden_dim=256, latent_dim=256, attention_dropout=0.0),
                          remat=args.remat)

    def build():  # random weights, created on the device under jit (no host copy)
        decoder = Decoder(decoder_config, dtype=dtype, rngs=nnx.Rngs(0))
        return SteerablePolicy(decoder, args.feature_dim, config, rngs=nnx.Rngs(1))

    graphdef = nnx.split(nnx.eval_shape(build), BaseParam, nnx.Param)[0]
    frozen, params = jax.jit(lambda: nnx.split(build(), BaseParam, nnx.Param)[1:])()
    optimizer = optax.adamw(1e-5)
    opt_state = optimizer.init(params)

    def step(params, opt_state, frozen, episodes):
        def loss(p):
            return nnx.merge(graphdef, frozen, p).objective(episodes, jax.random.key(0))[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, frozen, episodes).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    footprint = memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes - (
        memory.alias_size_in_bytes
    )
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        params, opt_state, value = compiled(params, opt_state, frozen, episodes)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times[1:]), "memory": footprint, "compile": compile_seconds, "loss": float(value)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--targets", type=int, default=9)
    parser.add_argument("--context", type=int, default=5)
    parser.add_argument("--feature-dim", type=int, default=4096, help="context features (Llama-3-8B: 4096)")
    parser.add_argument("--lora-rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    parser.add_argument("--bf16", action="store_true", help="bf16 base weights (fp32 LoRA/FiLM/encoder)")
    parser.add_argument("--qwen-1.5b", dest="qwen", action="store_true", help="the Qwen2.5-1.5B shape")
    args = parser.parse_args()

    decoder_config = QWEN_1P5B if args.qwen else DecoderConfig(
        model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_layers=args.layers, num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 128),
        head_dim=64, tie_word_embeddings=True,
    )
    decoder_config = dataclasses.replace(decoder_config, max_position_embeddings=max(args.seq, 64))
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    pool = make_pool(decoder_config, args.seq, args.feature_dim, pairs=4 * args.tasks * args.targets)
    spec = EpisodeSpec(num_targets=args.targets, min_context=args.context, max_context=args.context)
    episodes = sample_episodes(jax.random.key(0), pool, spec, args.tasks)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {decoder_config.num_layers} layers, hidden "
          f"{decoder_config.hidden_size}, vocab {decoder_config.vocab_size}, {jnp.dtype(dtype).name} base, LoRA r="
          f"{args.lora_rank} on q,v; batch {args.tasks} tasks x {args.targets} targets x 2 responses x {args.seq} "
          f"tokens, N^C = {args.context}")
    results = {}
    for kind in ("btl", "np"):
        for reference in ("precomputed", "on_the_fly"):
            results[kind, reference] = r = measure(decoder_config, dtype, kind, reference, episodes, args)
            name = {"btl": "LoRA-DPO", "np": "NP-DPO"}[kind]
            print(f"{name:9s} reference {reference:11s}: step {1e3 * r['seconds']:8.1f} ms, "
                  f"memory {r['memory'] / 2**20:8.1f} MiB, compile {r['compile']:.1f} s")
    base, conditioned = results["btl", "precomputed"], results["np", "precomputed"]
    print(f"NP-DPO / LoRA-DPO (precomputed reference): time {conditioned['seconds'] / base['seconds']:.3f}x, "
          f"memory {conditioned['memory'] / base['memory']:.3f}x")
    fly = results["np", "on_the_fly"]
    print(f"NP-DPO on-the-fly / precomputed reference: time {fly['seconds'] / conditioned['seconds']:.3f}x, "
          f"memory {fly['memory'] / conditioned['memory']:.3f}x")


if __name__ == "__main__":
    main()
