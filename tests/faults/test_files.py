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


def test_recorded_digests_keep_their_values():
    """Every digest nps writes to disk is one ``Digest`` framing; checkpoints, prepared datasets and
    embedding caches already on disk hold these values, so a change here would refuse them all."""
    import jax.numpy as jnp
    import numpy as np

    from nps.data.embedding_cache import tokens_digest
    from nps.data.pairs import OptionPairPool, PairPool
    from nps.data.prepared import _content_hash
    from nps.train.checkpoint import metadata_digest, state_digest
    from nps.train.loop import pools_digest

    pool = PairPool(jnp.arange(6, dtype=jnp.float32).reshape(3, 2), jnp.ones((3, 2)), jnp.zeros((3, 2)),
                    jnp.eye(3, 2))
    assert pools_digest(pool, OptionPairPool(pool, {"t": jnp.arange(4, dtype=jnp.int32)})) == \
        "217fb4cc7873998d7439654d7b0b6b11"
    state = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(0.5)}, "step": np.int32(7)}
    assert state_digest(state) == "1559b3fdd47b8c92b0d953beb6c45416"
    assert metadata_digest({"a": 1, "b": [1.5, "x"], "metadata_digest": "ignored"}) == "0375eaf62e5aff4d2dd1c704308f4752"
    assert tokens_digest([[1, 2, 3], [], [4]]) == "a98f1166b5d13b81d801f83cbed1184a"
    columns = {"prompt_id": np.array([0, 1]), "option_a_id": np.array([2, 3]), "option_b_id": np.array([4, 5]),
               "ratings_a": np.array([[1.0, 2.0], [3.0, 4.0]]), "ratings_b": np.array([[5.0, 1.0], [2.0, 2.5]]),
               "prompt": ["p", "q"], "response_a": ["a", "é"], "response_b": ["b", b"c"]}
    first_row = {name: values[:1] for name, values in columns.items()}
    assert _content_hash({"train": columns, "val": columns, "test": first_row}) == "b85189905da95275a72b94e939d3b475"
    assert texts_digest(["ab", "c", ""]) == "ed6521fd5227c85c5357b1aff06fc270"


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
