"""nps.files: atomic writes, exclusive locks across processes, digests, JSON-lines appends."""

import json
import multiprocessing
import os

import pytest

from nps.files import (
    LockedError,
    append_json_line,
    atomic_write_text,
    exclusive_lock,
    texts_digest,
)


def _try_lock(path, queue):
    try:
        with exclusive_lock(path, "the run folder"):
            queue.put("acquired")
    except LockedError as error:
        queue.put(str(error))


def test_a_second_process_cannot_take_a_held_lock_and_is_told_the_holder(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with exclusive_lock(tmp_path, "the run folder"):
        child = context.Process(target=_try_lock, args=(tmp_path, queue))
        child.start()
        child.join(60)
        message = queue.get(timeout=5)
        assert message == f"the run folder is in use by another nps process (pid {os.getpid()}); wait for it to " \
                          "finish, or use another folder"
    child = context.Process(target=_try_lock, args=(tmp_path, queue))
    child.start()
    child.join(60)
    assert queue.get(timeout=5) == "acquired"  # released when the holder's block ended


def test_atomic_write_leaves_no_temporary_file_and_replaces_whole(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_append_drops_a_line_cut_by_a_killed_writer_and_keeps_a_whole_one(tmp_path):
    path = tmp_path / "profile.jsonl"
    path.write_text('{"a": 1}\n{"b": 2')  # the second record lost its end
    with pytest.warns(UserWarning, match="dropped an unfinished last line"):
        append_json_line(path, {"c": 3})
    # Before issue 23 the cut line stayed in the middle of the file, which no reader took again.
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"c": 3}]
    path.write_text('{"a": 1}\n{"b": 2}')  # a whole record that lost its newline (a hand edit)
    append_json_line(path, {"c": 3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"a": 1}, {"b": 2}, {"c": 3}]


def test_texts_digest_separates_texts_by_length():
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
    assert texts_digest(["ab", "c"]) == texts_digest(iter(["ab", "c"]))


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "plot.json"
    atomic_write_text(path, "kept")

    def broken_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "lost")
    assert path.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.json"]


def test_an_append_that_fails_half_way_takes_its_line_back(tmp_path, monkeypatch):
    path = tmp_path / "profile.jsonl"
    append_json_line(path, {"a": 1})
    kept = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")  # the line is in the file, but not on the disk

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        append_json_line(path, {"b": 2})
    assert path.read_bytes() == kept
