"""NP-BTL on the synthetic task: the authors' released PyTorch code against `nps reproduce synthetic`,
side by side on this machine, in fresh processes, alternating.

    python benchmarks/bench_released_np_btl.py --released PATH --python PATH [--rounds 3] [--epochs 3]

``--released``: a checkout of the released code (github.com/kasia-kobalczyk/few-shot-steerable-alignment;
nps does not ship it). ``--python``: an interpreter with what it imports (torch, trl, transformers, peft,
datasets, hydra-core, omegaconf, pandas, tqdm, wandb). If the checkout has no synthetic data yet, its own
``data/gen_synthetic_data.py`` makes it first (untimed).

The released side is its synthetic NP-BTL config (``config/synthetic/config_nppl.yaml``) with
``model.device=cpu`` (no GPU here), ``model.sample_latents=False`` (its deterministic NP-BTL: the config's
sampled-latent path does not run as released, see /work/shared/paper.md §2.4, and the paper's model is the
deterministic one) and ``training.dry_run=True`` (no wandb, no checkpoints written to the authors' paths), as
``python src/train.py --config-path=../config/synthetic --config-name=config_nppl model.device=cpu
model.sample_latents=False training.dry_run=True`` runs it: the same ``Trainer`` on the same config, called
from a small driver so that its set-up, its training loop and the validation inside that loop are timed
apart. ``training.num_epochs=E`` gives ⌊16,039 / 64⌋ · (E + 1) iterations (its loop runs E + 1 epochs):
1,000 for the config's E = 3. The nps side is ``nps reproduce synthetic --set models=np_btl --set
train.steps=<the same number>``: training (validation on 512 tasks every 20 steps, checkpoints every 100),
the evaluation on 2,000 test tasks at five context sizes, and both plots.

Before each run it waits (up to ``--max-wait`` s) for the 1-minute load average to fall below
``--max-load``, and it reports the load at the start and the CPU that other processes used during the run
(the machine's busy time less the run's own, in cores); a run during which they used more than
``--max-other`` cores is discarded and run again (``--tries`` runs at most; the last one is kept). The
order of the two sides swaps every round.
Prints each run's times and the ratios (median and range over the rounds).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RELEASED_CONFIG = "config/synthetic/config_nppl.yaml"
RELEASED_OVERRIDES = ["model.device=cpu", "model.sample_latents=False", "training.dry_run=True"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}

# Runs in the released checkout under its interpreter: its own config and Trainer, timed in parts.
RELEASED_DRIVER = r"""
import json, os, sys, time
started = time.perf_counter()
root = os.getcwd()
sys.path[:0] = [root, os.path.join(root, "src")]  # as `python src/train.py` sees its modules
import numpy as np, torch
from omegaconf import OmegaConf
import train as released
cfg = OmegaConf.load(sys.argv[1])
cfg.merge_with_dotlist(sys.argv[2:])
OmegaConf.set_struct(cfg, True)  # as Hydra hands it over
np.random.seed(cfg.training.seed); torch.manual_seed(cfg.training.seed)  # as its train() does
trainer = released.Trainer(cfg=cfg, save_dir=None)
validation = [0.0, 0]
evaluate = trainer.eval
def timed_eval():
    start = time.perf_counter()
    try:
        return evaluate()
    finally:
        validation[0] += time.perf_counter() - start; validation[1] += 1
trainer.eval = timed_eval
iterations = [0]
step = trainer.optimizer.step
def counted_step(*args, **kwargs):
    iterations[0] += 1
    return step(*args, **kwargs)
trainer.optimizer.step = counted_step
ready = time.perf_counter()
trainer.train()
done = time.perf_counter()
print("RESULT " + json.dumps({"setup_seconds": ready - started, "train_seconds": done - ready,
                              "validation_seconds": validation[0], "validations": validation[1],
                              "iterations": iterations[0], "torch_threads": torch.get_num_threads(),
                              "torch": torch.__version__}))
"""


def load_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def busy_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (all cores) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_quiet(max_load: float, max_wait: float) -> float:
    deadline = time.monotonic() + max_wait
    load = load_1min()
    while load >= max_load and time.monotonic() < deadline:
        time.sleep(15)
        load = load_1min()
    return load


def timed_run(command: list[str], cwd: str | Path, env: dict[str, str], log: Path) -> dict:
    """Run ``command``; its wall-clock, and the CPU other processes used meanwhile (in cores)."""
    busy, own = busy_seconds(), children_cpu()
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code:
        sys.exit(f"{command[:4]} failed ({code}); see {log}")
    own_cpu = children_cpu() - own
    return {"process_seconds": wall, "own_cores": own_cpu / wall,
            "other_cores": max(busy_seconds() - busy - own_cpu, 0.0) / wall}


def released_iterations(released: Path, epochs: int, batch: int = 64) -> int:
    with open(released / "data/synthetic_data/synthetic.csv") as f:
        train = sum(row["split"] == "train" for row in csv.DictReader(f))
    return train // batch * (epochs + 1)  # drop_last batches, and its loop runs epochs + 1 times


def run_released(args, logs: Path, name: str) -> dict:
    env = os.environ | OFFLINE
    overrides = [*RELEASED_OVERRIDES, f"training.num_epochs={args.epochs}"]
    timing = timed_run([args.python, "-c", RELEASED_DRIVER, RELEASED_CONFIG, *overrides], args.released, env,
                       logs / f"{name}.log")
    line = next(l for l in (logs / f"{name}.log").read_text().splitlines() if l.startswith("RESULT "))
    return timing | json.loads(line[len("RESULT "):])


def run_nps(args, steps: int, logs: Path, name: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "nps.cli", "reproduce", "synthetic", "--out", out, "--quiet",
                   "--set", "models=np_btl", "--set", f"train.steps={steps}"]
        timing = timed_run(command, Path.cwd(), dict(os.environ), logs / f"{name}.log")
        results = json.loads((Path(out) / "results.json").read_text())
    model = results["models"]["np_btl"]
    return timing | {"run_seconds": results["wall_clock_seconds"], "model_seconds": model["wall_clock_seconds"],
                     "steps": model["train_steps"], "steps_per_second": model["train_steps_per_second"],
                     "accuracy_10": model["unseen_accuracy"]["10"]["all"]["mean"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} (range {min(values):.2f}–{max(values):.2f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--released", type=Path, required=True, help="a checkout of the released code")
    parser.add_argument("--python", required=True, help="the interpreter that runs the released code")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="the released config's training.num_epochs")
    parser.add_argument("--max-load", type=float, default=0.5, help="wait for a 1-minute load below this")
    parser.add_argument("--max-wait", type=float, default=900, help="seconds to wait for it before each run")
    parser.add_argument("--max-other", type=float, default=0.25,
                        help="run again when other processes used more than this many cores during a run")
    parser.add_argument("--tries", type=int, default=3, help="runs at most per side and round")
    parser.add_argument("--logs", type=Path, default=None, help="keep each run's output here")
    parser.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    args = parser.parse_args()
    args.released = args.released.resolve()
    if not (args.released / RELEASED_CONFIG).exists():
        sys.exit(f"{args.released}: no {RELEASED_CONFIG}; pass a checkout of the released code")
    if not (args.released / "data/synthetic_data/synthetic.csv").exists():
        print("making the released code's synthetic data (its data/gen_synthetic_data.py) ...", flush=True)
        subprocess.run([args.python, "data/gen_synthetic_data.py"], cwd=args.released, env=os.environ | OFFLINE,
                       check=True, capture_output=True)
    commit = subprocess.run(["git", "-C", str(args.released), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown (not a git checkout)"
    steps = released_iterations(args.released, args.epochs)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench_released_"))
    logs.mkdir(parents=True, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.machine())
    print(f"machine: {os.cpu_count()} cores ({cpu}); python {platform.python_version()}")
    print(f"released code: {args.released} at {commit}; nps: {steps} steps to match its {steps} iterations")
    print(f"released side: training.num_epochs={args.epochs} {' '.join(RELEASED_OVERRIDES)}\n"
          f"  'train' = its training loop (with the validation it runs every 7 iterations), set-up excluded;\n"
          f"  'process' = the whole process (imports, data loading, training)")
    print(f"nps side: nps reproduce synthetic --set models=np_btl --set train.steps={steps}\n"
          f"  'process' = the whole process (imports, compilation, training with validation every 20 steps, the\n"
          f"  2,000-task evaluation, both plots); 'train' = {steps} / its steps/s (compiled chunks, validation\n"
          f"  included, compilation excluded); 'run' = results.json's wall_clock_seconds (process less start-up)")
    print(f"logs: {logs}\n", flush=True)

    runs: list[dict] = []
    discarded: list[dict] = []
    for round_ in range(args.rounds):
        order = ("released", "nps") if round_ % 2 == 0 else ("nps", "released")
        for side in order:
            for attempt in range(1, args.tries + 1):
                load = wait_quiet(args.max_load, args.max_wait)
                name = f"{side}-{round_ + 1}-{attempt}"
                result = (run_released(args, logs, name) if side == "released" else run_nps(args, steps, logs, name))
                result |= {"side": side, "round": round_ + 1, "load_at_start": load, "attempt": attempt}
                if result["other_cores"] <= args.max_other or attempt == args.tries:
                    break
                discarded.append(result)
                print(f"round {round_ + 1} {side}: discarded, other processes used {result['other_cores']:.2f} "
                      f"cores ({result['process_seconds']:.1f} s); again", flush=True)
            runs.append(result)
            if side == "released":
                if result["iterations"] != steps:  # the process ratios compare equal amounts of training
                    sys.exit(f"the released code ran {result['iterations']} iterations, not the {steps} nps runs; "
                             "check its config's batch size and --epochs")
                train_rate = result["iterations"] / result["train_seconds"]
                print(f"round {round_ + 1} released: process {result['process_seconds']:.1f} s, train "
                      f"{result['train_seconds']:.1f} s = {train_rate:.2f} it/s ({result['iterations']} iterations; "
                      f"its {result['validations']} validations {result['validation_seconds']:.1f} s), set-up "
                      f"{result['setup_seconds']:.1f} s, torch threads {result['torch_threads']}; load "
                      f"{load:.2f}, other processes {result['other_cores']:.2f} cores", flush=True)
            else:
                train = result["steps"] / result["steps_per_second"]
                print(f"round {round_ + 1} nps:      process {result['process_seconds']:.1f} s = start-up "
                      f"{result['process_seconds'] - result['run_seconds']:.1f} s + run {result['run_seconds']:.1f} s "
                      f"(train {train:.1f} s = {result['steps_per_second']:.1f} steps/s; compilation, evaluation and "
                      f"plots {result['run_seconds'] - train:.1f} s); accuracy at N^C=10 "
                      f"{100 * result['accuracy_10']:.1f} %; load {load:.2f}, other processes "
                      f"{result['other_cores']:.2f} cores", flush=True)

    released = [r for r in runs if r["side"] == "released"]
    nps = [r for r in runs if r["side"] == "nps"]
    pairs = list(zip(sorted(released, key=lambda r: r["round"]), sorted(nps, key=lambda r: r["round"])))
    print("\nratios, each round's released run over the same round's nps run:")
    print("  released train (its loop)  / nps process (everything):  "
          + spread([r["train_seconds"] / n["process_seconds"] for r, n in pairs]))
    print("  released process           / nps process:               "
          + spread([r["process_seconds"] / n["process_seconds"] for r, n in pairs]))
    print("  nps steps/s / released it/s (training loops, validation included, compilation excluded): "
          + spread([n["steps_per_second"] * r["train_seconds"] / r["iterations"] for r, n in pairs]))
    print(f"released train: {spread([r['train_seconds'] for r in released])} s; "
          f"nps process: {spread([n['process_seconds'] for n in nps])} s")
    print(f"load at start: {min(r['load_at_start'] for r in runs):.2f}–{max(r['load_at_start'] for r in runs):.2f}; "
          f"other processes during runs: {min(r['other_cores'] for r in runs):.2f}–"
          f"{max(r['other_cores'] for r in runs):.2f} cores; {len(discarded)} disturbed runs discarded and rerun")
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "steps": steps, "runs": runs, "discarded": discarded},
                                        indent=1))


if __name__ == "__main__":
    main()
