"""The cost of adapting to one new user: PAL-A's, PAL-B's and LoRe's jitted per-user weight fit against
NP-BTL's encoder forward (its amortised z(C)), in this process on the same tasks.

    python benchmarks/bench_user_fit.py [--users 512] [--context 10] [--repeats 5]

Each model is built from its default config on the synthetic two-user task's scalar options (the fit's
cost does not depend on training, so the models are untrained); every call maps ``--users`` tasks with
N^C = ``--context`` to their per-user state (``context_latent``) in one compiled program. Prints the
compile time, the best of ``--repeats`` calls per user, the steps each fit takes and the ratio to
NP-BTL's encoder.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
from flax import nnx

from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.synthetic import two_user_pools
from nps.models.peers import PEER_MODELS
from nps.models.reward import SYNTHETIC_NP_BTL, build_reward_model


def seconds_per_call(model, episodes, repeats: int) -> tuple[float, float]:
    """(first call, compile included; best of ``repeats`` later calls) of the jitted ``context_latent``."""
    graphdef, state = nnx.split(model)
    latent = jax.jit(lambda state, episodes: nnx.merge(graphdef, state).context_latent(episodes))
    start = time.perf_counter()
    jax.block_until_ready(latent(state, episodes))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(latent(state, episodes))
        times.append(time.perf_counter() - start)
    return first, min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--context", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} {jax.default_backend()} "
          f"device(s), jax {jax.__version__}; {args.users} users, N^C = {args.context}")
    spec = EpisodeSpec(num_targets=max(20, args.context), max_context=args.context)
    episodes = sample_episodes(jax.random.key(0), two_user_pools()["test"], spec, args.users, args.context)
    models = {"np-btl encoder": (build_reward_model(1, SYNTHETIC_NP_BTL, 0), 0)}
    for name, (config_class, model_class) in PEER_MODELS.items():
        config = config_class()
        models[name] = (model_class(1, config, rngs=nnx.Rngs(0)), config.adapt_steps)
    print(f"{'model':<16}{'steps':>7}{'compile s':>11}{'µs per user':>13}{'ratio':>9}")
    baseline = None
    for name, (model, steps) in models.items():
        first, best = seconds_per_call(model, episodes, args.repeats)
        per_user = best / args.users * 1e6
        baseline = baseline or per_user
        print(f"{name:<16}{steps:>7}{first:>11.2f}{per_user:>13.1f}{per_user / baseline:>8.1f}x")


if __name__ == "__main__":
    main()
