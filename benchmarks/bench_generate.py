"""Generation throughput: nps's jitted KV-cache loop vs transformers' PyTorch ``generate``.

Both run greedy decoding of the same random Qwen2 weights (saved once with
``save_pretrained`` and loaded by each) on the same prompts, in one process.
Compilation is timed separately; throughput is the best of ``--repeats`` runs.
Needs the ``parity`` extra (torch). Usage:

    python benchmarks/bench_generate.py [--batch 8] [--new-tokens 128] [--layers 2] [--hidden 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (tokens compared)")
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args()

    import torch
    import transformers

    from nps.lm import SamplingConfig, from_pretrained, generate

    config = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(config).eval()
    prompts = np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.prompt))
    new = args.new_tokens
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        model = from_pretrained(directory, tokenizer=False).model

    sampling = SamplingConfig(max_new_tokens=new, temperature=args.temperature, top_p=args.top_p)
    greedy = args.temperature == 0.0
    start = time.perf_counter()
    jax.block_until_ready(generate(model, prompts, sampling=sampling).tokens)
    first = time.perf_counter() - start
    ours = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(generate(model, prompts, sampling=sampling).tokens)
        ours.append(time.perf_counter() - start)

    theirs = []
    inputs = torch.tensor(prompts)
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            ref = reference.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=not greedy,
                **({} if greedy else {"temperature": args.temperature, "top_p": args.top_p, "top_k": None}),
                eos_token_id=None,
                pad_token_id=0,
            )
            theirs.append(time.perf_counter() - start)
    agree = float(np.mean(np.asarray(out) == ref[:, args.prompt :].numpy()))
    tokens = args.batch * new
    ours_tps, theirs_tps = tokens / min(ours), tokens / min(theirs)
    print(
        f"model: Qwen2 {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
        f"batch {args.batch}, prompt {args.prompt}, {new} new tokens "
        + ("(greedy)" if greedy else f"(temperature {args.temperature}, top-p {args.top_p})")
    )
    print(f"nps generate:           {ours_tps:9.1f} tokens/s  (first call incl. compilation {first:.2f} s)")
    print(f"transformers generate:  {theirs_tps:9.1f} tokens/s  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    same = f"   greedy tokens identical: {agree:.1%}" if greedy else ""
    print(f"ratio nps / torch:      {ours_tps / theirs_tps:9.2f}x{same}")


if __name__ == "__main__":
    main()
