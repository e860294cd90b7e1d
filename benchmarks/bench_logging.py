"""What logging costs: `nps reproduce synthetic` end to end with TensorBoard logging on and off, in
this process, on this machine.

    python benchmarks/bench_logging.py [--pairs 2] [--set FIELD=VALUE ...] [--profile-steps 500:510] [--keep DIR]

A first run (logging off) compiles every program and is not counted; then the two settings run
in ABBA order (off, on, on, off, ...) so that a drift in the machine's load falls on both alike.
Each run is the whole experiment (three models × 1,000 steps, evaluation, plots, results.json)
into a fresh folder. Printed per run: wall-clock, this process's CPU time (all its threads; less
sensitive than wall-clock to other processes on a shared machine) and, with logging on, the time
spent inside the log's calls (writing every point, the evaluation table and the plots): the
overhead itself. With --profile-steps it also runs once with ``log.profile_steps`` and lists the
trace's files. --keep DIR keeps the runs' folders (e.g. for a TensorBoard screenshot).
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax

from nps.config import apply_overrides
from nps.experiments.synthetic import SyntheticConfig, run_synthetic
from nps.train.logging import RunLog

logging_seconds = [0.0]


def _timed_method(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            logging_seconds[0] += time.perf_counter() - start

    return wrapper


for _name in ("on_chunk", "evaluation", "images", "close"):  # every call that writes
    setattr(RunLog, _name, _timed_method(getattr(RunLog, _name)))


def timed_run(config: SyntheticConfig, backend: str, folder: Path) -> tuple[float, float, float]:
    """(wall-clock s, process CPU s, s inside the log's calls) of one whole run."""
    config = apply_overrides(config, [f"log.backend={backend}"])
    logging_seconds[0] = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    run_synthetic(config, folder, progress=False, echo=lambda *_: None)
    return time.perf_counter() - wall, time.process_time() - cpu, logging_seconds[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs of runs (default 2: four timed runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--profile-steps", default="", help="also run once with log.profile_steps=START:END")
    parser.add_argument("--keep", type=Path, help="write the runs here and keep them (default: a temporary folder)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} {jax.default_backend()} "
          f"device(s), jax {jax.__version__}")
    config = apply_overrides(SyntheticConfig(), args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        wall, cpu, _ = timed_run(config, "none", root / "warm-up")
        print(f"warm-up (compiles, not counted): {wall:.1f} s wall-clock, {cpu:.1f} s CPU", flush=True)
        results: dict[str, list[tuple[float, float, float]]] = {"none": [], "tensorboard": []}
        for index in range(2 * args.pairs):
            backend = ["none", "tensorboard", "tensorboard", "none"][index % 4]
            results[backend].append(timed_run(config, backend, root / f"run-{index + 1}-{backend}"))
            wall, cpu, logged = results[backend][-1]
            print(f"run {index + 1} log.backend={backend}: {wall:.1f} s wall-clock, {cpu:.1f} s CPU, "
                  f"{1000 * logged:.1f} ms in the log's calls", flush=True)
        for column, what in ((0, "wall-clock"), (1, "CPU")):
            off = statistics.mean(r[column] for r in results["none"])
            on = statistics.mean(r[column] for r in results["tensorboard"])
            print(f"{what}: off {off:.1f} s, on {on:.1f} s (means of {args.pairs} each): on / off = {on / off:.4f} "
                  f"({100 * (on / off - 1):+.2f} %)")
        logged = statistics.mean(r[2] for r in results["tensorboard"])
        off = statistics.mean(r[0] for r in results["none"])
        print(f"inside the log's calls: {1000 * logged:.1f} ms per run = {100 * logged / off:.3f} % of a run")
        if args.profile_steps:
            folder = root / "profiled"
            profiled = apply_overrides(config, [f"log.profile_steps={args.profile_steps}"])
            print(f"profiled run (log.profile_steps={args.profile_steps}): "
                  f"{timed_run(profiled, 'tensorboard', folder)[0]:.1f} s wall-clock")
            for path in sorted((folder / "logs").glob("*/plugins/profile/*/*")):
                print(f"  {path.relative_to(folder)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
