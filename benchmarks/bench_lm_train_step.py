"""Throughput and MFU of one training step (forward + backward) of a decoder LM built with nps.

The model is Qwen2.5-1.5B-shaped (28 layers, hidden 1536, vocab 151936) with random
bf16 base weights and fp32 LoRA adapters on q and v, as in the paper's 2025 config.
One step is ``jax.value_and_grad`` of the next-token cross-entropy with respect to
the trainable state (the LoRA adapters, or every weight with --full-finetune); no
optimiser update is applied, so the figure is the model's own cost. Compilation is
timed on its own, then --steps steps are timed after two warm-up steps.

    python benchmarks/bench_lm_train_step.py [--batch 8] [--seq 512] [--steps 10] [--remat none|full|dots]
        [--lora-rank 128] [--full-finetune] [--loss-chunk 128] [--peak-tflops X]
    python benchmarks/bench_lm_train_step.py --tiny --batch 2 --seq 64 --steps 2   # CPU smoke test

Model FLOPs (per token, forward + backward) follow the usual convention
6·N + 12·L·H·head_dim·T, where N counts the weights of every matmul (the LM head
included, the embedding lookup excluded) and the attention term counts the full
T × T score matrix. With LoRA the frozen base needs no weight gradient, so the work
actually required is about 4·N_base + 6·N_lora + attention; both MFUs are printed.
Recomputation (--remat, the chunked loss) is not counted as model FLOPs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from nps.layers import BaseParam
from nps.lm import Decoder, DecoderConfig, LoRAConfig
from nps.lm.decoder import projection_shapes

QWEN25_1P5B = DecoderConfig(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    rope_theta=1e6,
    qkv_bias=True,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)

TINY = DecoderConfig(
    model_type="qwen2",
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    qkv_bias=True,
    tie_word_embeddings=True,
)

# Dense bf16 peak FLOP/s by device kind; the first matching substring wins, so the
# more specific names come first.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
)


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def matmul_params(config: DecoderConfig, lora: LoRAConfig | None) -> tuple[int, int]:
    """(weights in the base model's matmuls, weights in the LoRA adapters' matmuls)."""
    shapes = projection_shapes(config)
    per_block = sum(out_dim * in_dim for out_dim, in_dim in shapes.values())
    base = config.num_layers * per_block + config.vocab_size * config.hidden_size  # + LM head
    adapters = 0
    if lora is not None:
        adapters = config.num_layers * sum(lora.rank * sum(shapes[name]) for name in lora.targets)
    return base, adapters


def attention_flops_per_token(config: DecoderConfig, seq: int) -> int:
    """Forward + backward FLOPs of the score and value matmuls (the standard 12·L·H·hd·T)."""
    return 12 * config.num_layers * config.num_heads * config.head_dim * seq


def chunked_next_token_loss(model: Decoder, hidden: jax.Array, tokens: jax.Array, mask: jax.Array,
                            chunk: int) -> jax.Array:
    """Mean next-token cross-entropy (fp32), computing the [B, chunk, V] logits one chunk at a time.

    Each chunk is rematerialised so the backward pass keeps only its hidden states, not
    its logits: peak memory holds one chunk's logits instead of the whole [B, T, V].
    """
    batch, seq = tokens.shape
    targets = jnp.roll(tokens, -1, axis=1)
    # Position t predicts token t + 1: both must be real, and the last position has no target.
    weights = (mask & jnp.roll(mask, -1, axis=1)).at[:, -1].set(False).astype(jnp.float32)

    def to_chunks(x):  # [B, T, ...] -> [T / chunk, B, chunk, ...], the leading axis mapped over
        return jnp.swapaxes(x.reshape(batch, seq // chunk, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_loss(args):
        hidden_chunk, target_chunk, weight_chunk = args
        logits = model.logits(hidden_chunk)  # fp32 [B, chunk, V]
        target_logit = jnp.take_along_axis(logits, target_chunk[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * weight_chunk)

    losses = jax.lax.map(chunk_loss, (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
    return jnp.sum(losses) / jnp.maximum(jnp.sum(weights), 1.0)


def build_step(config: DecoderConfig, lora: LoRAConfig, full_finetune: bool, remat: str, loss_chunk: int):
    """Random weights made on device, split into (trainable, frozen), and the jitted loss-and-grad."""
    # Built inside jit so each fp32 random draw fuses with its bf16 cast instead of being
    # materialised in fp32 first (and the allocator's peak stays that of the step).
    model = nnx.jit(lambda: Decoder(config, lora=lora, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))()
    if full_finetune:
        graphdef, trainable, frozen = nnx.split(model, nnx.Any(BaseParam, nnx.Param), ...)
        merge = lambda trainable, frozen: nnx.merge(graphdef, trainable, frozen)  # noqa: E731
    else:
        graphdef, frozen, trainable = nnx.split(model, BaseParam, nnx.Param)
        merge = lambda trainable, frozen: nnx.merge(graphdef, frozen, trainable)  # noqa: E731
    del model

    def loss(trainable, frozen, tokens, mask):
        model = merge(trainable, frozen)
        hidden, _ = model.hidden_states(tokens, mask, remat=remat)
        return chunked_next_token_loss(model, hidden, tokens, mask, loss_chunk)

    return jax.jit(jax.value_and_grad(loss)), trainable, frozen


def count(state) -> int:
    return sum(x.size for x in jax.tree.leaves(state))


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"], help="what each block keeps for the backward pass")
    parser.add_argument("--lora-rank", type=int, default=128)
    parser.add_argument("--full-finetune", action="store_true",
                        help="train the base weights too (gradient w.r.t. every weight)")
    parser.add_argument("--loss-chunk", type=int, default=128,
                        help="sequence positions per logits chunk of the loss (must divide --seq)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense bf16 TFLOP/s of the device (overrides the built-in table)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model for a CPU smoke test")
    args = parser.parse_args()
    args.loss_chunk = min(args.loss_chunk, args.seq)
    if args.seq % args.loss_chunk:
        parser.error(f"--loss-chunk {args.loss_chunk} must divide --seq {args.seq}")

    config = TINY if args.tiny else QWEN25_1P5B
    lora = LoRAConfig(rank=args.lora_rank, targets=("q", "v"))
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {jax.default_backend()} device: {device.device_kind} "
          f"({jax.device_count()} device(s), running on one)")
    print(f"model: {'tiny' if args.tiny else 'Qwen2.5-1.5B'}-shaped, {config.num_layers} layers, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}, bf16 base, LoRA r={lora.rank} on q,v (fp32)")
    print(f"step: batch {args.batch} x seq {args.seq}, remat={args.remat}, loss chunk {args.loss_chunk}, "
          f"trainable: {'all weights' if args.full_finetune else 'LoRA only'}")

    step, trainable, frozen = build_step(config, lora, args.full_finetune, args.remat, args.loss_chunk)
    print(f"parameters: {count(trainable):,} trainable, {count(frozen):,} frozen")
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, config.vocab_size)
    mask = jnp.ones((args.batch, args.seq), bool)

    start = time.perf_counter()
    compiled = step.lower(trainable, frozen, tokens, mask).compile()
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    jax.block_until_ready(compiled(trainable, frozen, tokens, mask))
    first_step_s = time.perf_counter() - start
    jax.block_until_ready(compiled(trainable, frozen, tokens, mask))  # second warm-up step

    start = time.perf_counter()
    for _ in range(args.steps):
        loss, grads = compiled(trainable, frozen, tokens, mask)
    jax.block_until_ready((loss, grads))
    step_s = (time.perf_counter() - start) / args.steps

    tokens_per_step = args.batch * args.seq
    tokens_per_s = tokens_per_step / step_s
    n_base, n_lora = matmul_params(config, lora)
    attention = attention_flops_per_token(config, args.seq)
    flops_6n = 6 * (n_base + n_lora) + attention  # per token, the 6N convention

    print(f"compile: {compile_s:.2f} s (first step after compiling: {first_step_s * 1e3:.1f} ms)")
    print(f"loss: {float(loss):.4f} (random weights: ~ln V = {float(jnp.log(config.vocab_size)):.4f})")
    print(f"step time: {step_s * 1e3:.1f} ms (mean of {args.steps})")
    print(f"tokens/s: {tokens_per_s:,.0f}")
    peak_bytes = (device.memory_stats() or {}).get("peak_bytes_in_use")
    # The allocator's peak spans the whole process (building the weights too); XLA's own
    # figure for the step's scratch buffers isolates the step.
    print(f"peak device memory: {format_bytes(peak_bytes) if peak_bytes is not None else 'n/a'}")
    step_memory = compiled.memory_analysis()
    if step_memory is not None:
        print(f"step buffers (XLA): {format_bytes(step_memory.temp_size_in_bytes)} temporaries, "
              f"{format_bytes(step_memory.argument_size_in_bytes)} arguments, "
              f"{format_bytes(step_memory.output_size_in_bytes)} outputs")
    print(f"matmul weights N: {n_base:,} base + {n_lora:,} LoRA; attention FLOPs/token: {attention:,}")

    peak = peak_flops(device.device_kind, args.peak_tflops)
    if peak is None:
        print("peak FLOP/s: unknown for this device (pass --peak-tflops); MFU: n/a")
        return
    source = "--peak-tflops" if args.peak_tflops is not None else "table"
    print(f"peak FLOP/s: {peak / 1e12:.0f} TFLOP/s dense bf16 ({source})")
    print(f"MFU, 6N convention (6N + attention = {flops_6n:.3g} FLOP/token): {flops_6n * tokens_per_s / peak:.1%}")
    if not args.full_finetune:
        # Frozen weights get no weight gradient: forward 2N + input gradient 2N is the work required.
        flops_4n = 4 * n_base + 6 * n_lora + attention
        print(f"MFU, work required with a frozen base (4N_base + 6N_lora + attention = {flops_4n:.3g} "
              f"FLOP/token; the frozen weights' gradients are not computed): {flops_4n * tokens_per_s / peak:.1%}")


if __name__ == "__main__":
    main()
