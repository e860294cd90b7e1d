"""A user's context as a file: JSON lines of {"prompt", "chosen", "rejected"} (extra fields allowed)."""

from __future__ import annotations

import json
from pathlib import Path

from nps.errors import ConfigError

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    """Every pair in a JSONL file, in order; a bad line is reported by file, line and field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file (expected JSON lines of prompt/chosen/rejected)")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg}); one pair per line") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: expected an object with {', '.join(PAIR_FIELDS)}")
        for field in PAIR_FIELDS:
            if not isinstance(record.get(field), str):
                raise ConfigError(f"{path}:{number}: field {field!r} is missing or not a string")
        pairs.append({field: record[field] for field in PAIR_FIELDS})
    return pairs
