"""A small UltraFeedback file in the release's schema, with the awkward cases real records have.

Ratings per completion as (helpfulness, honesty, truthfulness); instruction_following is 3.
p0: three rated answers; p1: three rated and one with helpfulness "N/A"; p2: a single answer;
p3: one rated answer and one with an empty response; p4: two answers tied on honesty;
p5: three answers on which all attributes agree.
"""

from __future__ import annotations

import json
from pathlib import Path

# Random files in the release's schema live in the library (the notebooks' offline fallback uses them too).
from nps.data.ultrafeedback import random_release_records as random_records  # noqa: F401
from nps.data.ultrafeedback import release_completion as completion
from nps.data.ultrafeedback import write_random_release as write_random_jsonl  # noqa: F401

NA = "N/A"
PROMPTS = {
    "p0": [(5, 1, 3), (4, 2, 3), (3, 3, 2)],
    "p1": [(2, 2, 2), (2, 5, 4), (NA, 3, 3), (4, 1, 5)],
    "p2": [(4, 4, 4)],
    "p3": [(3, 3, 3), None],  # None: a completion with an empty response
    "p4": [(1, 4, 1), (5, 4, 2)],
    "p5": [(5, 5, 5), (1, 1, 1), (3, 2, 4)],
}


def records() -> list[dict]:
    return [{"source": "fixture", "instruction": f"question {name}", "models": [],
             "completions": [completion(i, r) for i, r in enumerate(answers)]} for name, answers in PROMPTS.items()]


def write_jsonl(path: Path) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records()) + "\n")
    return path


def write_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    parquet.write_table(pa.Table.from_pylist(records()), path)
    return path
