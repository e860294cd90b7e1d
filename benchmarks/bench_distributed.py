"""The cost of crossing processes: training steps on 2 processes × 1 device against 1 process × 2 devices.

The same global batch, the same model and the same compiled data-parallel step in both layouts;
only where the two devices live differs, so the ratio is the price of the cross-process
collectives (gloo over loopback on CPU; NCCL / ICI on accelerators). Two workloads: the
synthetic task's NP-BTL (small parameters, a gather of their gradients per step) and an NP-DPO
step on a small decoder (LoRA, FiLM and encoder gradients; the base is frozen and replicated).

    python benchmarks/bench_distributed.py [--steps 200] [--workload np_btl|np_dpo|both]

Each layout runs in fresh processes; throughput is `fit`'s compiled steps/s (compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def worker(workload: str, steps: int) -> None:
    """Run inside each process: join the run, train, and (process 0) print steps/s as JSON."""
    from nps.train.distributed import join_run, leave_run

    join_run()
    import jax
    from flax import nnx

    from nps.data.episodes import EpisodeSpec
    from nps.train import TrainConfig, fit

    if workload == "np_btl":
        from nps.data.synthetic import two_user_pools
        from nps.models import SYNTHETIC_NP_BTL, build_reward_model

        pools = two_user_pools(num_pairs=20_000, seed=0)
        model = build_reward_model(1, SYNTHETIC_NP_BTL, seed=0)
        spec, train = EpisodeSpec(), TrainConfig(steps=steps, eval_every=50, checkpoint_every=50, val_tasks=64)
    else:
        from bench_dpo_step import make_pool

        from nps.encoder import EncoderConfig
        from nps.lm import Decoder, DecoderConfig, LoRAConfig
        from nps.models import PolicyConfig, SteerablePolicy

        decoder_config = DecoderConfig(model_type="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=256,
                                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32)
        pool = make_pool(decoder_config, seq=32, feature_dim=64, pairs=512)
        pools = {"train": pool, "val": pool}
        policy = SteerablePolicy(Decoder(decoder_config, rngs=nnx.Rngs(0)), 64,
                                 PolicyConfig(lora=LoRAConfig(rank=8, alpha=16.0),
                                              encoder=EncoderConfig(hidden_dim=64, latent_dim=32, num_heads=4,
                                                                    attention_dropout=0.0)),
                                 rngs=nnx.Rngs(1))
        model, spec = policy, EpisodeSpec(num_targets=4, max_context=2)
        train = TrainConfig(steps=steps, batch_size=4, eval_every=10, checkpoint_every=10, val_tasks=4,
                            learning_rate=1e-4)
    result = fit(model, pools["train"], pools["val"], spec, train, progress=False)
    if jax.process_index() == 0:
        print(json.dumps({"steps_per_second": result.steps_per_second, "devices": jax.device_count(),
                          "processes": jax.process_count()}))
    leave_run()


def layout(processes: int, devices_per_process: int, workload: str, steps: int) -> dict:
    """steps/s of ``workload`` with ``processes`` × ``devices_per_process`` CPU devices."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    program = [sys.executable, os.path.abspath(__file__), "--worker", workload, "--steps", str(steps)]
    if processes == 1:
        from nps.train.launch import cpu_devices_environment

        env = cpu_devices_environment(env, devices_per_process)  # other XLA flags kept, as in the launched layouts
        output = subprocess.run(program, env=env, capture_output=True, text=True, check=True).stdout
    else:
        from nps.train.launch import free_port, process_environment

        port = free_port()
        with tempfile.TemporaryDirectory() as folder:
            logs = [open(os.path.join(folder, f"{i}.out"), "w+") for i in range(processes)]
            children = [subprocess.Popen(program, stdout=logs[i], stderr=subprocess.DEVNULL,
                                         env=process_environment(i, processes, port, devices_per_process, None)
                                         | {"PYTHONPATH": env["PYTHONPATH"]})
                        for i in range(processes)]
            assert all(child.wait() == 0 for child in children)
            logs[0].seek(0)
            output = logs[0].read()
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workload", choices=("np_btl", "np_dpo", "both"), default="both")
    parser.add_argument("--worker", choices=("np_btl", "np_dpo"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    for workload in ("np_btl", "np_dpo") if args.workload == "both" else (args.workload,):
        steps = args.steps if workload == "np_btl" else max(20, args.steps // 5)
        one = layout(1, 2, workload, steps)
        two = layout(2, 1, workload, steps)
        print(f"{workload}: 1 process × 2 devices {one['steps_per_second']:.1f} steps/s, "
              f"2 processes × 1 device {two['steps_per_second']:.1f} steps/s: "
              f"cross-process steps take {one['steps_per_second'] / two['steps_per_second']:.2f}× as long")


if __name__ == "__main__":
    main()
