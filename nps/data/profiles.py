"""User profiles: a user's choices as JSON lines, collected from a candidate set and read as context.

A **candidate set** is JSON lines of ``{"prompt": ..., "responses": [first, second]}``; its
BLAKE2b hash identifies it. A **profile** is JSON lines, one per answered candidate::

    {"prompt", "chosen", "rejected", "time", "candidates": <hash>, "candidate": <line index>}

and, for a skipped candidate, ``{"prompt", "choice": "skip", "time", "candidates", "candidate"}``
(kept so that a resumed session does not ask it again; readers ignore it). Every command that
takes a user's context reads a profile with ``read_pairs``; hand-written files need only
prompt/chosen/rejected.

``collect`` asks the candidates in order (or in the order a ``next_candidate`` callback picks,
e.g. the most informative pair first), shows the two responses in a seeded random order so
that position cannot bias the choice, and appends each answer to the profile at once (flushed
and fsynced): an interrupted session keeps every answer, and running it again resumes. A
profile is written by one process at a time (an exclusive lock beside it). Scripted answers
(``nps collect --choices``) are answers by position in the profile: the k-th answer is the
profile's k-th record, so a resumed session records exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

from nps.errors import ConfigError, WriteError
from nps.files import (
    append_json_line,
    decode_utf8,
    exclusive_lock,
    is_unfinished_record,
    read_bytes,
    read_text,
    texts_digest,
)

PAIR_FIELDS = ("prompt", "chosen", "rejected")
PROFILE = "a profile: JSON lines of prompt/chosen/rejected"
CHOICES = ("first", "second", "skip")


class _Lines:
    """A JSON-lines file's records, and the byte offset and text of an unfinished last line (or None)."""

    def __init__(self, records: list[tuple[int, dict]], unfinished_at: int | None = None, unfinished: str = ""):
        self.records, self.unfinished_at, self.unfinished = records, unfinished_at, unfinished


def _json_lines(path: Path, expected: str, *, allow_unfinished: bool = False) -> _Lines:
    """Every record of a JSON-lines file, each line checked. ``allow_unfinished``: a last line with no
    newline that begins a record but is not whole (an interrupted write) is returned apart, not refused."""
    data = read_bytes(path, expected)
    # Lines end at "\n" only: JSON text may hold U+2028 or U+0085 raw, which str.splitlines would split.
    lines = data.split(b"\n")
    records, offset = [], 0
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        try:
            line = decode_utf8(raw, path, expected, first_line=number)
            record = json.loads(line) if line.strip() else None
        except (ConfigError, ValueError) as error:
            if last and allow_unfinished and is_unfinished_record(raw):
                return _Lines(records, offset, raw.decode("utf-8", "replace"))
            if isinstance(error, ConfigError):
                raise
            cut = " (the last line has no newline: cut off by an interrupted write?)" if last else ""
            raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg}){cut}; expected {expected}") from None
        offset += len(raw) + 1
        if record is None:
            continue
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: not a JSON object; expected {expected}")
        records.append((number, record))
    return _Lines(records)


def read_json_records(path: str | Path, expected: str) -> list[dict]:
    """Every record of a JSON-lines file, each line checked as a profile's are; ``expected`` says what
    the file should hold (for the one-line error)."""
    return [record for _, record in _json_lines(Path(path), expected).records]


def read_candidates(path: str | Path) -> tuple[list[dict], str]:
    """The candidate pairs ``[{"prompt", "responses": [a, b]}]`` of a file, and the set's hash."""
    path = Path(path)
    candidates = []
    for number, record in _json_lines(path, 'JSON lines of {"prompt": ..., "responses": [a, b]}').records:
        responses = record.get("responses")
        if not isinstance(record.get("prompt"), str) or not (
                isinstance(responses, list) and len(responses) == 2 and all(isinstance(r, str) for r in responses)):
            raise ConfigError(f"{path}:{number}: needs a 'prompt' string and 'responses', a list of two strings")
        candidates.append({"prompt": record["prompt"], "responses": list(responses)})
    if not candidates:
        raise ConfigError(f"{path}: no candidate pairs; add JSON lines of prompt and two responses")
    return candidates, candidates_hash(candidates)


def candidates_hash(candidates: Sequence[dict]) -> str:
    """The candidate set's identity: a digest of every prompt and response, in order."""
    return texts_digest(text for c in candidates for text in (c["prompt"], *c["responses"]))


def read_profile(path: str | Path, candidates: str | None = None) -> list[dict]:
    """Every record of a profile (answers and skips), checked; ``candidates``: the hash the
    profile must come from (a profile of another candidate set is refused)."""
    return _profile_records(Path(path), _json_lines(Path(path), PROFILE).records, candidates)


def _profile_records(path: Path, lines: list[tuple[int, dict]], candidates: str | None) -> list[dict]:
    records = []
    for number, record in lines:
        if record.get("choice") != "skip":
            for field in PAIR_FIELDS:
                if not isinstance(record.get(field), str):
                    raise ConfigError(f"{path}:{number}: field {field!r} is missing or not a string")
        if candidates is not None and record.get("candidates") != candidates:
            raise ConfigError(
                f"{path}:{number}: this answer comes from candidate set {record.get('candidates')!r}, not "
                f"{candidates!r}; use a new profile for these candidates"
            )
        records.append(record)
    return records


def repair_profile(path: Path, candidates: str | None = None) -> list[dict]:
    """Every record of a profile that this process holds the lock of (``exclusive_lock``), after dropping
    a last line that an interrupted write left unfinished, with a warning (its candidate is asked again);
    a profile of another candidate set or with a broken line elsewhere is refused as ``read_profile`` does."""
    lines = _json_lines(path, PROFILE, allow_unfinished=True)
    records = _profile_records(path, lines.records, candidates)
    if lines.unfinished_at is not None:
        os.truncate(path, lines.unfinished_at)
        warnings.warn(f"{path}: dropped an unfinished last line ({lines.unfinished[:40]!r}...), left by an "
                      "interrupted write; its candidate is asked again")
    return records


def read_pairs(path: str | Path, *, allow_empty: bool = True) -> list[dict[str, str]]:
    """A user's context: the answered pairs of a profile, in order, as prompt/chosen/rejected."""
    pairs = [{f: r[f] for f in PAIR_FIELDS} for r in read_profile(path) if r.get("choice") != "skip"]
    if not pairs and not allow_empty:
        raise ConfigError(f"{path}: the profile has no answered pairs; collect some with `nps collect`")
    return pairs


def collect(
    candidates_path: str | Path,
    profile_path: str | Path,
    choose: Callable[[str, str, str], str] | Sequence[str],
    *,
    next_candidate: Callable[[list[dict], list[dict], set[int]], int | None] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Ask ``choose(prompt, first, second) -> "first" | "second" | "skip" | "quit"`` about each
    candidate not yet in the profile, appending each answer at once. ``choose`` may instead be a
    sequence of scripted answers, the k-th for the profile's k-th record (a resumed session
    continues with the answer after the profile's last record; "quit" when they run out).
    ``next_candidate(candidates, answered records, asked indices)`` picks the next index (None:
    stop); default: file order. ``limit``: at most this many questions in this session.
    Returns the profile's records.

    The profile is locked for the session (a second ``collect`` on it is refused), and a last
    line that an interrupted write left unfinished is dropped with a warning (its candidate is
    asked again)."""
    candidates, digest = read_candidates(candidates_path)
    profile_path = Path(profile_path)
    if profile_path.is_dir():
        raise ConfigError(f"{profile_path}: is a folder, not a profile; pass a .jsonl file to write the answers to")
    with exclusive_lock(profile_path, f"the profile {profile_path}"):
        records = repair_profile(profile_path, digest) if profile_path.exists() else []
        ask = choose if callable(choose) else _scripted(list(choose), records)
        asked = {int(r["candidate"]) for r in records if "candidate" in r}
        questions = 0
        while limit is None or questions < limit:
            if next_candidate is None:
                index = next((i for i in range(len(candidates)) if i not in asked), None)
            else:
                index = next_candidate(candidates, [r for r in records if r.get("choice") != "skip"], asked)
            if index is None or index in asked:
                break
            candidate = candidates[index]
            # Seeded per candidate: the same candidate is always shown in the same order.
            swap = random.Random(f"{seed}:{index}").random() < 0.5
            shown = candidate["responses"][::-1] if swap else candidate["responses"]
            answer = ask(candidate["prompt"], shown[0], shown[1])
            if answer == "quit":
                break
            if answer not in CHOICES:
                raise ConfigError(f"choice {answer!r} for candidate {index}: answer one of first, second, skip "
                                  "(or quit)")
            record = {"prompt": candidate["prompt"]}
            if answer == "skip":
                record["choice"] = "skip"
            else:
                chosen = shown[0] if answer == "first" else shown[1]
                record |= {"chosen": chosen, "rejected": shown[1] if answer == "first" else shown[0]}
            record |= {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "candidates": digest, "candidate": index}
            try:
                append_json_line(profile_path, record)
            except OSError as error:
                raise WriteError(f"{profile_path}: the answer to candidate {index} could not be saved "
                                 f"({error.strerror}) and was not recorded; every earlier answer is kept: free disk "
                                 "space, then run the same command again to continue") from None
            records.append(record)
            asked.add(index)
            questions += 1
    return records


def _scripted(answers: list[str], records: list[dict]) -> Callable[[str, str, str], str]:
    """The chooser that answers the profile's next record with ``answers[len(records)]``."""

    def answer(prompt: str, first: str, second: str) -> str:
        return answers[len(records)] if len(records) < len(answers) else "quit"

    return answer


def choices_from_file(path: str | Path) -> list[str]:
    """Scripted answers: one per line (1 / 2 / s, or first / second / skip), the k-th for the profile's k-th record."""
    aliases = {"1": "first", "2": "second", "s": "skip", "first": "first", "second": "second", "skip": "skip"}
    answers = []
    for number, line in enumerate(read_text(path, "scripted choices, one of 1, 2, s per line").split("\n"), start=1):
        if line.strip():
            if line.strip().lower() not in aliases:
                raise ConfigError(f"{path}:{number}: {line.strip()!r} is not a choice; use 1, 2 or s")
            answers.append(aliases[line.strip().lower()])
    return answers


def ask_in_terminal(prompt: str, first: str, second: str) -> str:
    """The interactive chooser: shows the prompt and both responses, reads 1 / 2 / s / q."""
    print(f"\n=== prompt ===\n{prompt}\n\n--- [1] ---\n{first}\n\n--- [2] ---\n{second}\n")
    while True:
        try:
            answer = input("Which response do you prefer? [1/2, s = skip, q = quit] ").strip().lower()
        except EOFError:
            return "quit"
        if answer in ("1", "2", "s", "q"):
            return {"1": "first", "2": "second", "s": "skip", "q": "quit"}[answer]
