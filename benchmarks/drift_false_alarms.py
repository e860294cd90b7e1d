"""How often the drift test flags a stable user: stable profiles only, more of them than
`nps reproduce consistency` draws, at the default alert threshold (or --threshold).

    python benchmarks/drift_false_alarms.py --out runs/consistency [--users 200] [--threshold 0.04] [--shuffle 0]

``--out`` is a finished `nps reproduce consistency` folder: its synthetic NP-BTL checkpoints are
reused (nothing is trained) and its `steering_run` (or `<out>/steering`) is loaded. Per task and
candidate set, ``--users`` stable users answer 20 random pairs (seed 2026; permutation seeds
20,000 + user). With ``--shuffle K`` each profile is also tested in K random orders of its answers:
an exact permutation test flags a reordered profile with probability at most the threshold
whatever its answers, so this separates a property of the test from one of the sampled profiles.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from nps.config import apply_overrides
from nps.experiments.consistency import CANDIDATE_SETS, ConsistencyConfig, _steering, _synthetic
from nps.workflow.consistency import ALERT_THRESHOLD, drift_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="a finished `nps reproduce consistency` folder")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=ALERT_THRESHOLD)
    parser.add_argument("--shuffle", type=int, default=0, help="also test each profile in this many random orders")
    args = parser.parse_args()
    recorded = json.loads((args.out / "results.json").read_text())["config"]
    config = apply_overrides(ConsistencyConfig(), [f"steering_run={recorded['steering_run']}"])
    tasks = {"synthetic": _synthetic(config, args.out, False)[0],
             "steering": _steering(config, args.out, False, print)}
    counts = {}
    for name, task in tasks.items():
        for which in CANDIDATE_SETS:
            subset, rng, shuffle, start = task.subset(which), np.random.default_rng(2026), np.random.default_rng(99), time.time()
            flagged = reordered = 0
            for user in range(args.users):
                chosen, rejected = subset.profile(rng, np.full(config.answers, user % 2))
                flagged += drift_test(subset.model, chosen, rejected, threshold=args.threshold, seed=20_000 + user).flagged
                for _ in range(args.shuffle):
                    order = shuffle.permutation(config.answers)
                    take = lambda tree: jax.tree.map(lambda x: x[order], tree)  # noqa: B023, E731
                    reordered += drift_test(subset.model, take(chosen), take(rejected), threshold=args.threshold,
                                            seed=20_000 + user).flagged
            counts[f"{name}/{which}"] = flagged
            line = f"{name} {which}: {flagged} of {args.users} stable users flagged ({100 * flagged / args.users:.1f} %)"
            if args.shuffle:
                line += f"; reordered: {reordered} of {args.users * args.shuffle}"
            print(f"{line}, {time.time() - start:.0f} s", flush=True)
    total = sum(counts.values())
    rate = total / (len(counts) * args.users)
    print(f"all: {total} of {len(counts) * args.users} = {100 * rate:.2f} ± "
          f"{100 * np.sqrt(rate * (1 - rate) / (len(counts) * args.users)):.2f} % at threshold {args.threshold}")


if __name__ == "__main__":
    main()
