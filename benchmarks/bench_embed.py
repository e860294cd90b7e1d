"""Option-embedding throughput (options/s): nps's ``embed_tokens`` vs transformers' PyTorch model.

The paper's option features are a frozen LM's last-token hidden state. Both sides embed the
same random token sequences with the same random Qwen2 weights (saved once, loaded by each),
in one process, with the same batch size. nps sorts by length and pads to power-of-two
buckets; the baseline pads each batch in the given order to its longest sequence (as the
released code's DataLoader does). Lengths follow a log-normal around UltraFeedback-like
options (median ~250 tokens, clipped to [16, max]). Needs the ``parity`` extra (torch) for
the baseline; ``--no-baseline`` times nps alone (e.g. an 8B shape on a GPU). Usage:

    python benchmarks/bench_embed.py [--options 256] [--layers 4] [--hidden 512] [--batch 16]
    python benchmarks/bench_embed.py --llama3-8b --bf16 --no-baseline --options 2048 --batch 32   # GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np


def lengths(count: int, max_length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(250), 0.7, count), 16, max_length).astype(int)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--llama3-8b", action="store_true", help="Llama-3-8B's shape (random weights)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    import jax.numpy as jnp

    from nps.lm import Decoder, DecoderConfig
    from nps.lm.generate import embed_tokens

    if args.llama3_8b:
        config = DecoderConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                               qkv_bias=False, rms_norm_eps=1e-5)
    else:
        config = DecoderConfig(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                               intermediate_size=args.hidden * 11 // 4, num_layers=args.layers,
                               num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 128),
                               head_dim=64, qkv_bias=True, tie_word_embeddings=True)
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    sizes = lengths(args.options, args.max_length)
    rng = np.random.default_rng(1)
    sequences = [rng.integers(1, config.vocab_size, n).tolist() for n in sizes]
    print(f"{jax.devices()[0].device_kind}: {args.options} options, mean {sizes.mean():.0f} tokens "
          f"(max {sizes.max()}), batch {args.batch}, {config.num_layers} layers × {config.hidden_size}, "
          f"{dtype.__name__}")

    with tempfile.TemporaryDirectory() as directory:
        if args.no_baseline:
            from flax import nnx

            model = Decoder(config, dtype=dtype, rngs=nnx.Rngs(0))
        else:
            import torch
            import transformers

            from nps.lm import from_pretrained

            torch.manual_seed(0)
            reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config.to_hf())).eval()
            reference.save_pretrained(directory)
            model = from_pretrained(directory, dtype=dtype, tokenizer=False).model

        warm = embed_tokens(model, sequences, batch_size=args.batch)  # compiles every bucket once
        start = time.perf_counter()
        ours = embed_tokens(model, sequences, batch_size=args.batch)
        seconds = time.perf_counter() - start
        print(f"nps: {args.options / seconds:,.1f} options/s ({seconds:.2f} s; warm-up with compilation "
              f"was separate)")
        assert np.allclose(warm, ours)
        if args.no_baseline:
            return

        start = time.perf_counter()
        theirs = np.zeros_like(ours)
        with torch.inference_mode():
            for first in range(0, len(sequences), args.batch):
                rows = sequences[first : first + args.batch]
                width = max(len(r) for r in rows)
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for i, row in enumerate(rows):
                    ids[i, : len(row)] = torch.tensor(row)
                    mask[i, : len(row)] = 1
                hidden = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
                last = torch.tensor([len(r) - 1 for r in rows])
                theirs[first : first + len(rows)] = hidden[torch.arange(len(rows)), last].float().numpy()
        baseline = time.perf_counter() - start
    print(f"transformers (torch, padded in order): {args.options / baseline:,.1f} options/s ({baseline:.2f} s)")
    print(f"ratio nps / transformers: {baseline / seconds:.2f}x; max |Δ| of the features: "
          f"{np.abs(ours - theirs).max():.2e}")


if __name__ == "__main__":
    main()
