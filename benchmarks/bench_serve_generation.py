"""The app's steered generation under concurrent load: one request at a time against batched (``nps.serve.batching``).

    python benchmarks/bench_serve_generation.py [--users 1 8 32] [--requests 64] [--new-tokens 32]

A steered policy (LoRA + FiLM + encoder, untrained: the work is the same as a trained one's) on the tiny
offline Qwen2 (``nps.lm.tiny``: 3 layers, hidden 64, a real tokenizer and chat template), served through
``SteeringRun.generate`` with the run's chat codec. ``users`` threads each send requests back to back
(a chat prompt and their own z, a new seed each time) until ``requests`` replies came back. Baseline: the
requests take turns on the model, one call each (what the app did before batching); batched: they go
through a ``GenerationBatcher`` (``max_wait`` 0: a batch is whatever waits when the model frees). Every
program either mode meets is compiled before the clock starts. Printed
per number of users: requests/s, p50 and p95 latency, reply tokens/s (replies tokenised again) and the
mean batch size, with batched/baseline ratios, in this one process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from nps.data.episodes import EpisodeSpec
from nps.encoder import EncoderConfig
from nps.lm import LoRAConfig, from_pretrained
from nps.lm.text import ChatCodec
from nps.lm.tiny import write_tiny_model
from nps.models.policy import PolicyConfig, SteerablePolicy
from nps.serve.batching import GenerationBatcher, GenerationRequest
from nps.steering_run import OptionEmbedder, SteeringRun

PROMPTS = ["How do I boil an egg?", "Name a prime number.", "What is the capital of France?",
           "Explain photosynthesis briefly, in two sentences.", "Write one sentence about rain.",
           "How many legs has a spider, and why?", "Is the moon made of cheese?", "Tell me about foxes."]


def tiny_run(directory: Path, new_tokens: int) -> SteeringRun:
    write_tiny_model(directory, "qwen2", seed=0)
    base = from_pretrained(directory)
    config = PolicyConfig(kind="np", encoder=EncoderConfig(hidden_dim=16, latent_dim=8),
                          lora=LoRAConfig(rank=2, alpha=4.0, targets=("q", "v")))
    policy = SteerablePolicy(base.model, base.config.hidden_size, config, rngs=nnx.Rngs(0))
    embedder = OptionEmbedder(base.model, lambda prompts, responses, what: [[1]] * len(prompts))
    return SteeringRun(policy, base.model, ChatCodec(base.tokenizer, new_tokens), embedder, 1.0, EpisodeSpec(),
                       "np_dpo", directory, base.weights_hash, "benchmark", ("a", "b"), lambda: None)


def load(users: int, total: int, reply, seed: int = 0) -> tuple[float, list[float], list[str]]:
    """``users`` threads calling ``reply(prompt, z, seed)`` until ``total`` replies: (seconds, latencies, replies)."""
    rng = np.random.default_rng(seed)
    zs = rng.normal(size=(users, 8)).astype(np.float32)
    latencies, replies, counter, guard = [], [], iter(range(total)), threading.Lock()

    def person(index: int) -> None:
        while True:
            with guard:
                number = next(counter, None)
            if number is None:
                return
            start = time.perf_counter()
            text = reply(PROMPTS[number % len(PROMPTS)], zs[index], 1000 * seed + number)
            with guard:
                latencies.append(time.perf_counter() - start)
                replies.append(text)

    threads = [threading.Thread(target=person, args=(i,)) for i in range(users)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    run = tiny_run(Path(tempfile.mkdtemp()) / "tiny-qwen2", args.new_tokens)
    turn = threading.Lock()

    def one_at_a_time(prompt, z, seed):
        with turn:
            return run.generate([prompt], jax.numpy.asarray(z), seed=seed)[0]

    batcher = GenerationBatcher(run, max_batch=max(args.users))

    def batched(prompt, z, seed):
        return batcher.generate([GenerationRequest(prompt, z, seed)])[0]

    z = np.zeros(8, np.float32)
    for prompt in PROMPTS:  # every program either mode meets: each prompt alone, each batch size of each width
        one_at_a_time(prompt, z, 0)
        size = 1
        while size < 2 * batcher.max_batch:  # a batch pads to a power of two rows, which may exceed max_batch
            batcher.generate([GenerationRequest(prompt, z, 0) for _ in range(size)])
            size *= 2
    tokens = lambda replies: sum(len(run.codec.tokenizer(r)["input_ids"]) for r in replies)  # noqa: E731
    print(f"{jax.devices()[0].platform}, {jax.device_count()} device(s); tiny Qwen2, {args.new_tokens} new tokens "
          f"at most, {args.requests} requests per row")
    print(f"{'users':>5} {'mode':>14} {'req/s':>8} {'p50 s':>8} {'p95 s':>8} {'tokens/s':>9} {'batch':>6}")
    for users in args.users:
        row = {}
        for name, reply in (("one at a time", one_at_a_time), ("batched", batched)):
            before = len(batcher.batches)
            seconds, latencies, replies = load(users, args.requests, reply, seed=2)
            sizes = batcher.batches[before:] if name == "batched" else [1]
            row[name] = (args.requests / seconds, statistics.median(latencies),
                         float(np.percentile(latencies, 95)), tokens(replies) / seconds, float(np.mean(sizes)))
            rate, p50, p95, per_second, batch = row[name]
            print(f"{users:>5} {name:>14} {rate:>8.1f} {p50:>8.3f} {p95:>8.3f} {per_second:>9.0f} {batch:>6.1f}")
        ratio = row["batched"][0] / row["one at a time"][0]
        print(f"{users:>5} {'ratio':>14} {ratio:>7.2f}x {row['batched'][1] / row['one at a time'][1]:>7.2f}x "
              f"{row['batched'][2] / row['one at a time'][2]:>7.2f}x")


if __name__ == "__main__":
    main()
