"""The preference app's store: people, their profiles and A/B judgements, the history of their z.

One folder, held by one server at a time (``nps.files.exclusive_lock``)::

    people/<name>/person.json    name, group, SHA-256 of the person's key, when created
    people/<name>/profile.jsonl  the person's answers, in the format of ``nps collect``
                                 (``nps.data.profiles``), plus the display position of each choice
    people/<name>/ab.jsonl       the person's blind A/B judgements
    history.jsonl                every z inferred for anyone: person, profile hash, run fingerprint, z
    exports/<content hash>/      preference datasets exported from every profile

Names are checked against ``NAME_PATTERN`` before they touch a path, so a name can never reach
outside ``people/``. Every append is one fsynced JSON line (``append_json_line``); the writes of
one person are serialised by that person's lock (``person_lock``), so a read-check-append
sequence (answer a candidate only once) is atomic per person.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nps.data.profiles import PAIR_FIELDS, read_json_records, read_profile
from nps.errors import ConfigError, NPSError
from nps.files import LockedError, append_json_line, atomic_write_json, exclusive_lock, texts_digest

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
NAME_RULE = "1–32 characters: lower-case letters, digits, '-' or '_', starting with a letter or digit"
EXPORT_FORMAT = "nps-preferences"
EXPORT_VERSION = 1
HISTORY = "the history of z, one JSON object per line"


class StoreError(NPSError):
    """A request the store refuses: ``status`` is the HTTP status the app answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_name(name: str, field: str = "name") -> str:
    """``name`` if it is a valid person or group name (never a path), else a StoreError (400)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise StoreError(f"{field} {name[:40]!r}: use {NAME_RULE}" if isinstance(name, str)
                         else f"{field}: missing; use {NAME_RULE}")
    return name


def profile_hash(pairs: list[dict[str, str]]) -> str:
    """The identity of a profile version as z sees it: BLAKE2b of its answered pairs, in order."""
    return texts_digest(pair[field] for pair in pairs for field in PAIR_FIELDS)


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _read_json_lines(path: Path, expected: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file the app wrote (none if it is not there yet); a broken line
    is a StoreError (409) naming it."""
    if not path.exists():
        return []
    try:
        return read_json_records(path, expected)
    except ConfigError as error:
        raise StoreError(f"{error}; fix or delete that line", 409) from None


class Store:
    """A store folder; ``open()`` takes its lock for as long as the server runs."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.people_dir = self.directory / "people"
        self.history_path = self.directory / "history.jsonl"
        self.exports_dir = self.directory / "exports"
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._history_guard = threading.Lock()
        self._history: dict[tuple[str, str, str], dict[str, Any]] | None = None
        self._stack = contextlib.ExitStack()

    # -- lifetime ----------------------------------------------------------------------------------
    def open(self) -> Store:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(exclusive_lock(self.directory, f"the store {self.directory}"))
        self.people_dir.mkdir(exist_ok=True)
        return self

    def close(self) -> None:
        self._stack.close()

    # -- people ------------------------------------------------------------------------------------
    def person_dir(self, name: str) -> Path:
        return self.people_dir / check_name(name)

    def profile_path(self, name: str) -> Path:
        return self.person_dir(name) / "profile.jsonl"

    def ab_path(self, name: str) -> Path:
        return self.person_dir(name) / "ab.jsonl"

    @contextlib.contextmanager
    def person_lock(self, name: str) -> Iterator[None]:
        """Serialise one person's reads-then-writes (other people are not blocked)."""
        with self._locks_guard:
            lock = self._locks.setdefault(check_name(name), threading.Lock())
        with lock:
            yield

    def people(self) -> list[str]:
        """Every person's name, sorted."""
        return sorted(p.name for p in self.people_dir.iterdir()
                      if NAME_PATTERN.fullmatch(p.name) and (p / "person.json").exists())

    def person(self, name: str) -> dict[str, Any] | None:
        """The person's record (name, group, key digest, created), or None if there is no such person."""
        path = self.person_dir(name) / "person.json"
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise StoreError(f"{path}: not valid JSON; restore it from a backup or delete the person's folder",
                             409) from None
        return record

    def create_person(self, name: str, group: str) -> str | None:
        """A new person's secret key (for their personal link), or None if the name is taken."""
        check_name(group, "group")
        with self.person_lock(name):
            directory = self.person_dir(name)
            if (directory / "person.json").exists():
                return None
            directory.mkdir(parents=True, exist_ok=True)
            key = secrets.token_urlsafe(18)
            atomic_write_json(directory / "person.json", {"name": name, "group": group, "key_sha256": _key_digest(key),
                                                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            return key

    def verify(self, name: str, key: str) -> bool:
        """Whether ``key`` is the person's key (constant-time comparison of digests)."""
        if not NAME_PATTERN.fullmatch(name or ""):
            return False
        try:
            record = self.person(name)
        except StoreError:  # an unreadable person.json signs nobody in
            return False
        return isinstance(record, dict) and hmac.compare_digest(str(record.get("key_sha256", "")), _key_digest(key))

    # -- profiles and A/B judgements -----------------------------------------------------------------
    def profile(self, name: str, candidates: str) -> list[dict[str, Any]]:
        """The person's profile records (answers and skips); a broken or foreign file is a StoreError (409)."""
        path = self.profile_path(name)
        if not path.exists():
            return []
        try:
            return read_profile(path, candidates)
        except ConfigError as error:
            raise StoreError(f"{error} (the profile is left as it is until someone repairs it)", 409) from None

    def append_answer(self, name: str, record: dict[str, Any]) -> None:
        """Append one profile record, fsynced (the caller holds the person's lock). The profile's own
        lock is held while writing, as ``nps collect`` holds it: the two never write one profile at once."""
        path = self.profile_path(name)
        try:
            with exclusive_lock(path, f"the profile {path}"):
                append_json_line(path, record)
        except LockedError as error:
            raise StoreError(f"{error}; nothing was recorded", 409) from None

    def judgements(self, name: str) -> list[dict[str, Any]]:
        return _read_json_lines(self.ab_path(name), "blind A/B judgements, one JSON object per line")

    def append_judgement(self, name: str, record: dict[str, Any]) -> None:
        append_json_line(self.ab_path(name), record)

    # -- history of z -----------------------------------------------------------------------------------
    def _history_index(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        if self._history is None:
            index = {}
            for record in _read_json_lines(self.history_path, HISTORY):
                index.setdefault((record.get("person"), record.get("profile_hash"), record.get("run_fingerprint")),
                                 record)
            self._history = index
        return self._history

    def recorded_latent(self, name: str, profile: str, fingerprint: str) -> np.ndarray | None:
        """z [d] recorded for this person, profile version and run, or None."""
        with self._history_guard:
            record = self._history_index().get((name, profile, fingerprint))
        return None if record is None else np.asarray(record["z"], np.float32)

    def record_latent(self, name: str, profile: str, fingerprint: str, z: np.ndarray, answers: int) -> np.ndarray:
        """Record z for (person, profile version, run) unless one is recorded; returns the recorded z."""
        with self._history_guard:
            index = self._history_index()
            key = (name, profile, fingerprint)
            if key not in index:
                record = {"person": name, "profile_hash": profile, "answers": answers, "run_fingerprint": fingerprint,
                          "z": [float(v) for v in np.asarray(z, np.float32)],
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                append_json_line(self.history_path, record)
                index[key] = record
            return np.asarray(index[key]["z"], np.float32)

    def history(self, name: str | None = None) -> list[dict[str, Any]]:
        """The recorded z of one person (or of everyone), oldest first."""
        return [r for r in _read_json_lines(self.history_path, HISTORY) if name is None or r.get("person") == name]

    # -- export -------------------------------------------------------------------------------------------
    def export(self, candidates: str, run_fingerprint: str) -> tuple[Path, dict[str, Any]]:
        """Every readable profile's answered pairs as one versioned dataset under ``exports/<hash>/``:
        ``pairs.jsonl`` (person, group and the profile fields per answer) and ``metadata.json``
        (format, version, counts, skipped profiles and the content hash). The same answers give
        the same hash and folder; a folder appears only when complete."""
        rows, people, skipped = [], {}, {}
        for name in self.people():
            try:
                group = (self.person(name) or {}).get("group", "")
                answers = [r for r in self.profile(name, candidates) if r.get("choice") != "skip"]
            except StoreError as error:
                skipped[name] = str(error)
                continue
            people[name] = {"group": group, "answers": len(answers)}
            rows += [{"person": name, "group": group} | r for r in answers]
        content_hash = texts_digest(str(row.get(field, "")) for row in rows
                                    for field in ("person", "group", *PAIR_FIELDS))
        metadata = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "content_hash": content_hash,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "candidates": candidates,
                    "run_fingerprint": run_fingerprint, "pairs": len(rows), "people": people,
                    "skipped_profiles": skipped}
        target = self.exports_dir / content_hash
        if (target / "metadata.json").exists():
            return target, json.loads((target / "metadata.json").read_text())
        self.exports_dir.mkdir(exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{content_hash}.", dir=self.exports_dir))
        try:
            (partial / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                 encoding="utf-8")
            atomic_write_json(partial / "metadata.json", metadata)
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return target, metadata
