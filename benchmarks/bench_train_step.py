"""Training throughput of the synthetic reward models: nps's scanned, in-jit-sampled
steps against a per-step loop (one jitted sampler call and one jitted update per
step, the usual PyTorch-style structure), both in this process on the same model.

    python benchmarks/bench_train_step.py [--steps 300] [--end-to-end]

Prints iterations/s (compilation excluded) and the ratio nps / per-step loop; with
--end-to-end it also times `nps reproduce synthetic` (compilation included).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time

import jax
import optax
from flax import nnx

from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.synthetic import two_user_pools
from nps.layers import BaseParam
from nps.models.reward import SYNTHETIC_NP_BTL, RewardModelConfig, build_reward_model
from nps.train.loop import TrainConfig, _episode_loss, fit, make_optimizer


# The models as `nps reproduce synthetic` trains them.
MODELS = {"btl": RewardModelConfig(kind="btl"), "dpl": RewardModelConfig(kind="dpl"), "np": SYNTHETIC_NP_BTL}


def per_step_loop_rate(kind: str, pools, spec: EpisodeSpec, config: TrainConfig, steps: int) -> float:
    graphdef, frozen, params = nnx.split(build_reward_model(1, MODELS[kind], 0), BaseParam, ...)
    frozen, params = nnx.to_pure_dict(frozen), nnx.to_pure_dict(params)
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(params, opt_state, episodes, key):
        grads = jax.grad(lambda p: _episode_loss(graphdef, frozen, p, episodes, key)[0])(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    key = jax.random.key(0)
    for step in range(steps + 5):  # the first 5 steps compile and warm up
        if step == 5:
            jax.block_until_ready(params)
            start = time.perf_counter()
        data_key, model_key = jax.random.split(jax.random.fold_in(key, step))
        episodes = sample_episodes(data_key, pools["train"], spec, config.batch_size)
        params, opt_state = update(params, opt_state, episodes, model_key)
    jax.block_until_ready(params)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--end-to-end", action="store_true")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}")
    pools, spec = two_user_pools(), EpisodeSpec()
    config = TrainConfig(steps=args.steps, eval_every=args.steps // 3, checkpoint_every=args.steps // 3)
    print(f"{'model':<8}{'nps it/s':>10}{'per-step it/s':>15}{'ratio':>8}")
    for kind, label in (("btl", "btl"), ("dpl", "dpl"), ("np", "np_btl")):
        result = fit(build_reward_model(1, MODELS[kind], 0), pools["train"], pools["val"], spec, config,
                     progress=False)
        baseline = per_step_loop_rate(kind, pools, spec, config, args.steps)
        print(f"{label:<8}{result.steps_per_second:>10.1f}{baseline:>15.1f}{result.steps_per_second / baseline:>7.2f}x")
    if args.end_to_end:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nps.cli", "reproduce", "synthetic", "--out", out, "--quiet"],
                           check=True, capture_output=True)
            print(f"nps reproduce synthetic, end to end (compile included): {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
