"""The cost of handing a model to a compiled function, four ways, in this process on the same model.

    python benchmarks/bench_model_calls.py [--calls 300]

One small compiled call (a user's latent from 8 context pairs, ``context_latent``) on NP-BTL, timed
per call after compilation, where the model crosses the jit boundary:

- split: ``nnx.split(model)`` at each call, the graphdef static, the state an argument (nps's one
  convention, ``nps.models.interface``);
- pytree: ``jax.jit`` over the module as a pytree (NNX modules are pytrees);
- nnx.jit: Flax's own transform, which also propagates state updates back to the module;
- split outside: the state split once and reused (the floor: nothing but the dispatch).

Prints µs per call and each way's ratio to the split convention.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from nps.data.episodes import Episodes
from nps.models.reward import SYNTHETIC_NP_BTL, UF_NP_BTL, build_reward_model


def contexts(option_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    chosen = jax.random.normal(jax.random.key(0), (1, 8, option_dim))
    return chosen, -chosen, jnp.ones((1, 8), bool)


def latent(model, chosen, rejected, mask):
    return model.context_latent(Episodes(chosen, rejected, mask, None, None, None, None, None, None))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def latent_of_state(graphdef, state, chosen, rejected, mask):
    return latent(nnx.merge(graphdef, state), chosen, rejected, mask)


latent_of_pytree = jax.jit(latent)
latent_of_nnx = nnx.jit(latent)


def microseconds_per_call(call, calls: int) -> float:
    jax.block_until_ready(call())  # compile
    start = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(call())
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}")
    for name, config, option_dim in (("NP-BTL synthetic", SYNTHETIC_NP_BTL, 1),
                                     ("NP-BTL UltraFeedback", UF_NP_BTL, 1024)):
        model = build_reward_model(option_dim, config, 0)
        inputs = contexts(option_dim)
        graphdef, state = nnx.split(model)
        ways = {
            "split (nps)": lambda: latent_of_state(*nnx.split(model), *inputs),
            "pytree jax.jit": lambda: latent_of_pytree(model, *inputs),
            "nnx.jit": lambda: latent_of_nnx(model, *inputs),
            "split outside": lambda: latent_of_state(graphdef, state, *inputs),
        }
        times = {way: microseconds_per_call(call, args.calls) for way, call in ways.items()}
        leaves = len(jax.tree.leaves(state))
        print(f"\n{name} ({leaves} parameter arrays)")
        for way, value in times.items():
            print(f"  {way:<16} {value:8.0f} µs/call   ×{value / times['split (nps)']:.2f} of split")


if __name__ == "__main__":
    main()
