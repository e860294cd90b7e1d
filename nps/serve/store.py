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

One bad file never takes the app down for everyone: a person's unreadable ``person.json`` or
profile is that person's 409 (and a row of the admin page naming it); ``history.jsonl``, whose z
can be recomputed, is read past damaged lines. A profile's last line cut by an interrupted write
(a kill, a full disk) is dropped when the profile is read, as ``nps collect`` drops it, and an
answer that cannot be written (a full disk) is refused with 507 and leaves nothing behind.
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

from nps.data.profiles import PAIR_FIELDS, read_json_records, read_profile, repair_profile
from nps.errors import ConfigError, NPSError
from nps.files import LockedError, append_json_line, atomic_write_json, exclusive_lock, read_bytes, texts_digest

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
NAME_RULE = "1–32 characters: lower-case letters, digits, '-' or '_', starting with a letter or digit"
EXPORT_FORMAT = "nps-preferences"
EXPORT_VERSION = 1
HISTORY = "the history of z, one JSON object per line"
PERSON_FIELDS = ("name", "group", "key_sha256")  # strings every person.json holds


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
        self.write_problem: str | None = None  # why answers cannot be saved (a full disk), until one is

    # -- lifetime ----------------------------------------------------------------------------------
    def open(self) -> Store:
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"{self.directory}: is a file; pass a folder for the store (--store)")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._stack.enter_context(exclusive_lock(self.directory, f"the store {self.directory}"))
            self.people_dir.mkdir(exist_ok=True)
        except OSError as error:
            self.close()
            raise ConfigError(f"{self.directory}: cannot be used as the store ({error.strerror}); pass a folder you "
                              "can write to (--store)") from None
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
        """The person's record (name, group, key digest, created), or None if there is no such person;
        a file that is not such a record is a StoreError (409) naming it."""
        path = self.person_dir(name) / "person.json"
        if not path.exists():
            return None
        fix = "restore it from a backup or delete the person's folder"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise StoreError(f"{path}: cannot be read ({error.strerror}); {fix}", 409) from None
        except ValueError:
            raise StoreError(f"{path}: not valid JSON; {fix}", 409) from None
        if not isinstance(record, dict):
            raise StoreError(f"{path}: a JSON {type(record).__name__}, not a person's record; {fix}", 409)
        for field in PERSON_FIELDS:
            if not isinstance(record.get(field), str):
                raise StoreError(f"{path}: {field!r} is {record.get(field)!r}, not a string; {fix}", 409)
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
    def profile(self, name: str) -> list[dict[str, Any]]:
        """The person's profile records (answers and skips, of any candidate set); a last line that an
        interrupted write left unfinished is dropped (under the profile's lock, as ``nps collect``
        does); any other broken line is a StoreError (409) naming it."""
        path = self.profile_path(name)
        if not path.exists():
            return []
        try:
            try:
                return read_profile(path)
            except ConfigError:
                if not path.is_file():
                    raise
                with exclusive_lock(path, f"the profile {path}"):  # a cut last line is dropped, else it raises again
                    return repair_profile(path)
        except (ConfigError, LockedError) as error:
            raise StoreError(f"{error} (the profile is left as it is until someone repairs it)", 409) from None

    def append_answer(self, name: str, record: dict[str, Any]) -> None:
        """Append one profile record, fsynced (the caller holds the person's lock). The profile's own
        lock is held while writing, as ``nps collect`` holds it: the two never write one profile at once.
        An answer the disk cannot take is refused (507) and leaves nothing behind; ``write_problem``
        says why until an answer is saved again."""
        path = self.profile_path(name)
        try:
            with exclusive_lock(path, f"the profile {path}"):
                append_json_line(path, record)
        except LockedError as error:
            raise StoreError(f"{error}; nothing was recorded", 409) from None
        except OSError as error:
            self.write_problem = self.write_problem or f"{error.strerror}, since {time.strftime('%H:%M:%S')}"
            raise StoreError(f"the server could not save your answer ({error.strerror}): it was not recorded. "
                             "Answers cannot be saved until the server has disk space again; then answer again",
                             507) from None
        self.write_problem = None

    def judgements(self, name: str) -> list[dict[str, Any]]:
        return _read_json_lines(self.ab_path(name), "blind A/B judgements, one JSON object per line")

    def append_judgement(self, name: str, record: dict[str, Any]) -> None:
        append_json_line(self.ab_path(name), record)

    # -- history of z -----------------------------------------------------------------------------------
    def _history_records(self) -> list[dict[str, Any]]:
        """The usable records of history.jsonl, oldest first. Its z can always be recomputed, so a damaged
        line (a kill mid-append, a hand edit) is passed over rather than refusing everyone's z."""
        if not self.history_path.exists():
            return []
        try:
            data = read_bytes(self.history_path, HISTORY)
        except ConfigError as error:
            raise StoreError(str(error), 409) from None
        records = []
        for line in data.split(b"\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and all(isinstance(record.get(k), str) for k in
                                                ("person", "profile_hash", "run_fingerprint", "time")) and \
                    isinstance(record.get("z"), list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              for v in record["z"]):
                records.append(record)
        return records

    def _history_index(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        if self._history is None:
            index = {}
            for record in self._history_records():
                index.setdefault((record["person"], record["profile_hash"], record["run_fingerprint"]), record)
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
        return [r for r in self._history_records() if name is None or r["person"] == name]

    # -- export -------------------------------------------------------------------------------------------
    def export(self, candidates: str, run_fingerprint: str) -> tuple[Path, dict[str, Any]]:
        """Every readable profile's answered pairs as one versioned dataset under ``exports/<hash>/``:
        ``pairs.jsonl`` (person, group and the profile fields per answer, each naming the candidate set
        it was answered from) and ``metadata.json`` (format, version, counts, the answers per candidate
        set, the profiles left out with the reason, and the content hash). The same answers give the
        same hash and folder; a folder appears only when complete."""
        rows, people, skipped, sets = [], {}, {}, {}
        for name in self.people():
            try:
                group = (self.person(name) or {}).get("group", "")
                answers = [r for r in self.profile(name) if r.get("choice") != "skip"]
            except StoreError as error:
                skipped[name] = str(error)
                continue
            people[name] = {"group": group, "answers": len(answers)}
            rows += [{"person": name, "group": group} | r for r in answers]
            for answer in answers:
                sets[str(answer.get("candidates"))] = sets.get(str(answer.get("candidates")), 0) + 1
        content_hash = texts_digest(str(row.get(field, "")) for row in rows
                                    for field in ("person", "group", *PAIR_FIELDS))
        metadata = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "content_hash": content_hash,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "candidates": candidates,
                    "run_fingerprint": run_fingerprint, "pairs": len(rows), "people": people,
                    "answers_per_candidate_set": sets, "skipped_profiles": skipped}
        target = self.exports_dir / content_hash
        if (target / "metadata.json").exists():  # the same answers: the same dataset, described as of now
            stored = json.loads((target / "metadata.json").read_text())
            metadata["created"] = stored.get("created", metadata["created"])
            if stored != metadata:  # e.g. another profile left out this time
                atomic_write_json(target / "metadata.json", metadata)
            return target, metadata
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
