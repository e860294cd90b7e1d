"""Files that nps writes and reads: atomic writes, exclusive locks, digests, JSON lines.

One home for the rules every writer follows (docs/design.md, "Checkpoints and files"):

- a result, plot or manifest appears under its name only when complete (written to a
  temporary name in the same folder, fsynced, then renamed);
- a folder or file that a process writes for a while (an ``--out``, a profile, a prepared
  dataset, the app's store) is held by an exclusive ``flock``; a second writer gets one line
  naming the holder's pid, never a half-mixed file;
- digests of what nps records are BLAKE2b (``Digest``: texts length-prefixed, so no two lists of texts
  share one; arrays with their dtype and shape), of files SHA-256;
- an appended JSON line is flushed and fsynced before the caller moves on, a line that cannot be
  written whole (a full disk) is taken back, and a file whose last line lost its newline (a killed
  writer) is repaired before anything is glued to it;
- a text file that a person hands to nps is read whole as UTF-8, and a missing file, a folder,
  an unreadable file or bytes that are not UTF-8 are one line naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from nps.errors import ConfigError, NPSError

LOCK_NAME = ".nps.lock"


class LockedError(NPSError):
    """Another process holds the lock of a folder or file that this one would write."""


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` only when the block completes (fsynced, then
    renamed over any old file); if the block raises, no trace of it is left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def atomic_save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """``fig.savefig`` into a temporary file, renamed into place (a kill never leaves a 0-byte PNG)."""
    path = Path(path)
    with atomic_open(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    return path


@contextlib.contextmanager
def exclusive_lock(target: str | Path, what: str | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``target`` (a folder: ``<folder>/.nps.lock``; a file: ``<file>.lock``).

    A second process asking for the same lock fails at once with ``LockedError`` naming the
    holder's pid; the lock is released when the block ends or the process dies (``flock``).
    ``what`` describes the target in the message (default: its path).
    """
    target = Path(target)
    lock_path = target / LOCK_NAME if target.is_dir() else target.with_name(target.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise LockedError(
                f"{what or target} is in use by another nps process (pid {holder}); wait for it to finish, "
                "or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Digest:
    """BLAKE2b-128, fed part by part: the one hash behind every digest nps records (a checkpoint's state
    and the pools it trained on, a prepared dataset's records, embedded token sequences, texts).

    A part whose size varies is framed so that no two different sequences of parts share a digest:
    ``framed`` puts its length first, ``array`` its dtype and shape. Each recorded digest's framing is
    part of its definition (digests on disk must keep their values), so callers choose it.
    """

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=16)

    def raw(self, data: bytes | memoryview) -> Digest:
        """``data`` as it is, unframed."""
        self._hash.update(data)
        return self

    def framed(self, data: bytes, length: int | None = None) -> Digest:
        """``data`` after its length as 8 little-endian bytes (``length``: another count, e.g. of tokens)."""
        self._hash.update((len(data) if length is None else length).to_bytes(8, "little") + data)
        return self

    def array(self, array: Any, label: str = "") -> Digest:
        """An array after ``label``, its dtype and its shape (a scalar counts as shape (1,)), in C order."""
        array = np.ascontiguousarray(array)
        self._hash.update(f"{label}{array.dtype}|{array.shape}|".encode())
        self._hash.update(array.tobytes())
        return self

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def texts_digest(texts: Iterable[str]) -> str:
    """BLAKE2b-128 over texts, each prefixed by its UTF-8 length (so ["ab", "c"] ≠ ["a", "bc"])."""
    digest = Digest()
    for text in texts:
        digest.framed(text.encode("utf-8"))
    return digest.hexdigest()


def _last_line(f: BinaryIO, size: int) -> tuple[int, bytes]:
    """Where the last line of a file of ``size`` bytes begins, and its bytes (read back to its newline)."""
    start, tail = size, b""
    while start > 0 and b"\n" not in tail:
        step = min(start, 1 << 16)
        start -= step
        f.seek(start)
        tail = f.read(step) + tail
    cut = tail.rfind(b"\n") + 1
    return start + cut, tail[cut:]


def is_unfinished_record(line: bytes) -> bool:
    """A line begun as a JSON object that does not parse: what a writer killed (or stopped by a full disk)
    mid-line leaves."""
    if not line.lstrip().startswith(b"{"):
        return False
    try:
        json.loads(line)
    except ValueError:  # UnicodeDecodeError is one: a line cut inside a character
        return True
    return False


def append_json_line(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line, flushed and fsynced before returning.

    If the file's last line has no newline, it is a record a writer was killed in the middle of
    (``is_unfinished_record``: dropped, with a warning, as ``nps collect`` drops it) or a whole
    one that lost its newline (kept: a newline is written first), so the new record never joins
    it. If the line cannot be written whole (``OSError``: a full disk), the file is cut back to
    its old size before the error is raised, so no unfinished line is left behind for readers.
    """
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "ab+", buffering=0) as f:
        size = f.seek(0, os.SEEK_END)
        if size > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                start, last = _last_line(f, size)
                if is_unfinished_record(last):
                    os.ftruncate(f.fileno(), start)
                    size = start
                    warnings.warn(f"{path}: dropped an unfinished last line ({last[:40].decode('utf-8', 'replace')!r}"
                                  "...), left by an interrupted write")
                else:
                    line = b"\n" + line
        try:
            written = 0
            while written < len(line):  # a write near a full disk may take only part of the line
                written += f.write(line[written:])
            os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):  # cutting a file back frees space: it works on a full disk
                os.ftruncate(f.fileno(), size)
                os.fsync(f.fileno())
            raise


def read_bytes(path: str | Path, expected: str) -> bytes:
    """The bytes of the file at ``path``; ``expected`` says what it should hold (for the message).

    A missing file, a folder or an unreadable file raise ``ConfigError`` naming it, never a traceback.
    """
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; expected {expected}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a file; pass the file of {expected}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror}); expected {expected}") from None


def decode_utf8(data: bytes, path: str | Path, expected: str, first_line: int = 1) -> str:
    """``data`` (the file's text from line ``first_line`` on) as UTF-8, or ``ConfigError`` naming the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        raise ConfigError(f"{path}:{line}: not UTF-8 text; expected {expected}, saved as UTF-8") from None


def read_text(path: str | Path, expected: str) -> str:
    """The UTF-8 text of the file at ``path``; every problem is one ``ConfigError`` line (see ``read_bytes``)."""
    return decode_utf8(read_bytes(path, expected), path, expected)
