"""What logging costs: `nps reproduce synthetic` end to end with TensorBoard logging on and off, in
this process, on this machine.

    python benchmarks/bench_logging.py [--pairs 2] [--set FIELD=VALUE ...] [--profile-steps 500:510]

A first run (logging off) compiles every program and is not counted; then the two settings run
in ABBA order (off, on, on, off, ...) so that a drift in the machine's load falls on both alike.
Each run is the whole experiment (three models × 1,000 steps, evaluation, plots, results.json)
into a fresh folder. Prints each run's wall-clock, the means and the ratio on / off.
With --profile-steps it also runs once with ``log.profile_steps`` and lists the trace's files.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax

from nps.config import apply_overrides
from nps.experiments.synthetic import SyntheticConfig, run_synthetic


def timed_run(config: SyntheticConfig, backend: str, folder: Path) -> float:
    config = apply_overrides(config, [f"log.backend={backend}"])
    start = time.perf_counter()
    run_synthetic(config, folder, progress=False, echo=lambda *_: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs of runs (default 2: four timed runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--profile-steps", default="", help="also run once with log.profile_steps=START:END")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} {jax.default_backend()} "
          f"device(s), jax {jax.__version__}")
    config = apply_overrides(SyntheticConfig(), args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"warm-up (compiles, not counted): {timed_run(config, 'none', root / 'warm-up'):.1f} s", flush=True)
        times: dict[str, list[float]] = {"none": [], "tensorboard": []}
        order = ["none", "tensorboard", "tensorboard", "none"] * args.pairs
        for index, backend in enumerate(order[: 2 * args.pairs]):
            seconds = timed_run(config, backend, root / f"run-{index}")
            times[backend].append(seconds)
            print(f"run {index + 1} log.backend={backend}: {seconds:.1f} s", flush=True)
        off, on = statistics.mean(times["none"]), statistics.mean(times["tensorboard"])
        print(f"logging off {off:.1f} s, on {on:.1f} s (means of {len(times['none'])}): on / off = {on / off:.4f} "
              f"({100 * (on / off - 1):+.2f} %)")
        if args.profile_steps:
            folder = root / "profiled"
            profiled = apply_overrides(config, [f"log.profile_steps={args.profile_steps}"])
            print(f"profiled run: {timed_run(profiled, 'tensorboard', folder):.1f} s")
            for path in sorted((folder / "logs").glob("*/plugins/profile/*/*")):
                print(f"  {path.relative_to(folder)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
