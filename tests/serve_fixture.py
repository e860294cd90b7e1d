"""One tiny `nps reproduce steering` run for every test of the preference app, built once per machine.

The run lives in the system temp folder under a name keyed by its settings and by the code that
shapes it, so a test session reuses the run of an earlier one (on a fresh machine the first
session builds it, about a minute on 2 cores). Two pytest-xdist workers never build it twice:
the builder holds an exclusive lock, the other waits for the finished ``results.json``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from nps.files import LockedError, exclusive_lock

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ROOT / "examples" / "steering" / "candidates.jsonl"
TINY_STEERING = (
    "models=np_dpo", "corpus_size=2000", "pretrain.steps=60", "num_prompts=600", "episodes.num_targets=8",
    "episodes.max_context=4", "train.steps=30", "train.eval_every=10", "train.checkpoint_every=10",
    "train.val_tasks=8", "eval.num_tasks=8", "eval.context_sizes=0", "generations_per_point=2", "continuum_points=2",
)
# A change to any of these files may change what the run holds: it gets a new folder.
SHAPING_CODE = ("nps/experiments/steering.py", "nps/data/steering.py", "nps/models/policy.py", "nps/serve/steering.py",
                "nps/lm/decoder.py", "nps/encoder.py")


def tiny_steering_run(timeout: float = 900.0) -> Path:
    """The folder of the shared tiny steering run (built here if no session has built it yet)."""
    from nps.config import apply_overrides
    from nps.experiments.steering import SteeringConfig, run_steering

    digest = hashlib.blake2b("\n".join(TINY_STEERING).encode(), digest_size=8)
    for name in SHAPING_CODE:
        digest.update((ROOT / name).read_bytes())
    folder = Path(tempfile.gettempdir()) / f"nps-tests-steering-{os.getuid()}-{digest.hexdigest()}"
    deadline = time.monotonic() + timeout
    while not (folder / "results.json").exists():
        try:
            with exclusive_lock(folder.with_name(folder.name + ".build"), "the tests' steering run"):
                if not (folder / "results.json").exists():
                    run_steering(apply_overrides(SteeringConfig(), list(TINY_STEERING)), folder, progress=False,
                                 echo=lambda *_: None)
        except LockedError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for another worker to build {folder}") from None
            time.sleep(1.0)
    return folder
