"""`nps collect`: a person answers pairs in the terminal (or from a file of scripted answers) into a profile.

    nps collect --candidates CANDIDATES.jsonl --profile ME.jsonl [--choices FILE] [--limit N] [--active RUN]

The session is ``nps.data.profiles.collect``: every answer is fsynced as it is given, so an
interrupted session keeps them all and the same command continues it. ``--active RUN`` asks the
most informative pair first, judged by a trained run's NP-DPO policy (a steering or an hh-dpo run).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from nps.data.profiles import ask_in_terminal, choices_from_file, collect, read_profile
from nps.steering_run import SteeringRun

INTERRUPTED = 130  # the exit status of a session stopped by Ctrl-C (128 + SIGINT), its answers kept


def collect_profile(candidates: str, profile: str, *, choices: str | None = None, limit: int | None = None,
                    seed: int = 0, active: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Ask, record and say how many pairs the profile holds; on Ctrl-C, say what it keeps and return
    ``INTERRUPTED`` (0 otherwise)."""
    try:
        records = collect(candidates, profile, choices_from_file(choices) if choices else ask_in_terminal,
                          next_candidate=SteeringRun.load(active).informative_order(candidates) if active else None,
                          limit=limit, seed=seed)
    except KeyboardInterrupt:
        kept = read_profile(profile) if Path(profile).is_file() else []
        skipped = sum(r.get("choice") == "skip" for r in kept)
        print(f"nps: interrupted: {profile} keeps {len(kept) - skipped} answers and {skipped} skips; "
              "run the same command again to continue where you stopped", file=sys.stderr)
        return INTERRUPTED
    skipped = sum(r.get("choice") == "skip" for r in records)
    echo(f"{profile}: {len(records) - skipped} answered, {skipped} skipped")
    return 0
