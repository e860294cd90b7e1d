"""A small UltraFeedback file in the release's schema, with the awkward cases real records have.

Ratings per completion as (helpfulness, honesty, truthfulness); instruction_following is 3.
p0: three rated answers; p1: three rated and one with helpfulness "N/A"; p2: a single answer;
p3: one rated answer and one with an empty response; p4: two answers tied on honesty;
p5: three answers on which all attributes agree.
"""

from __future__ import annotations

import json
from pathlib import Path

NA = "N/A"
PROMPTS = {
    "p0": [(5, 1, 3), (4, 2, 3), (3, 3, 2)],
    "p1": [(2, 2, 2), (2, 5, 4), (NA, 3, 3), (4, 1, 5)],
    "p2": [(4, 4, 4)],
    "p3": [(3, 3, 3), None],  # None: a completion with an empty response
    "p4": [(1, 4, 1), (5, 4, 2)],
    "p5": [(5, 5, 5), (1, 1, 1), (3, 2, 4)],
}


def completion(index: int, ratings) -> dict:
    if ratings is None:
        return {"model": "m", "response": "", "annotations": {}}
    names = ("helpfulness", "honesty", "truthfulness")
    annotations = {name: {"Rating": str(value), "Rationale": "..."} for name, value in zip(names, ratings)}
    annotations["instruction_following"] = {"Rating": "3", "Rationale": "..."}
    return {"model": f"model-{index}", "response": f"answer {index}", "annotations": annotations,
            "fine-grained_score": 3.0, "overall_score": 6.0}


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


WORDS = ["the", "answer", "is", "helpful", "honest", "maybe", "clearly", "because", "fox", "dog", "step", "first"]


def random_records(num_prompts: int, seed: int = 0, answers: int = 4) -> list[dict]:
    """Records with random 1–5 ratings and short random texts (for end-to-end runs)."""
    import random

    rng = random.Random(seed)
    out = []
    for p in range(num_prompts):
        completions = []
        for a in range(answers):
            ratings = (rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5))
            item = completion(a, ratings)
            item["response"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            completions.append(item)
        out.append({"source": "fixture", "instruction": f"question {p}: " + " ".join(rng.choice(WORDS) for _ in range(4)),
                    "models": [], "completions": completions})
    return out


def write_random_jsonl(path: Path, num_prompts: int, seed: int = 0) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in random_records(num_prompts, seed)) + "\n")
    return path
