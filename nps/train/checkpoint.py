"""Orbax checkpoints of a training state pytree plus JSON metadata, verified before they are trusted.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves no half-written step behind. On top of that:

- every save records a BLAKE2b digest of the state's bytes in the step's metadata, and one of the
  metadata itself (the run's fingerprint, the training history, the sampler's step): a restore
  checks the metadata's digest before it reads anything in them and the state's after reading it,
  so a flipped byte in an array file (which Orbax reads without a word) or an edited number in the
  metadata is caught, and the step is treated as corrupted (metadata without a digest cannot be
  verified: treated so too);
- a corrupted or unreadable step is moved aside to ``<dir>.corrupt/<step>`` (never over an
  earlier quarantined copy) with a one-line warning, and the previous step is used;
- the caller's ``accept(metadata)`` sees a step's verified metadata *before* any state is read, so a
  checkpoint of another configuration is refused with the caller's message and never mistaken
  for corruption, nor corruption for another configuration; nor is a state whose shapes differ
  from the template's. Such a refusal never advises discarding the checkpoints (they verify).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from nps.errors import CheckpointError
from nps.files import Digest
from nps.train.distributed import PeerLostError, barrier, host_value, is_peer_failure, is_primary, lost_peers



def _not_from_orbax(record: logging.LogRecord) -> bool:
    """Orbax logs every failure it raises (tracebacks from each of its threads, hundreds of lines for
    one full disk); ``CheckpointStore`` turns each of those failures into one line, so its logs go."""
    return f"{os.sep}orbax{os.sep}" not in record.pathname


logging.getLogger("absl").setLevel(logging.WARNING)
logging.getLogger("absl").addFilter(_not_from_orbax)


def abstract_tree(tree):
    """Shape/dtype/sharding skeleton of ``tree``: the restore target Orbax checks against and places into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_layout(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{dotted path: (shape, dtype)} of every leaf, whatever the containers (NamedTuple, dict)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_name(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for path, leaf in leaves}


@contextlib.contextmanager
def _stderr_kept_unless_failed() -> Iterator[None]:
    """Hold what is written to the process's stderr (file descriptor 2) while the block runs; pass it
    on if the block succeeds, drop it if it fails. A failed Orbax write prints a traceback from each
    of tensorstore's callbacks straight to fd 2 (past Python's logging); the caller reports the
    failure in one line instead."""
    sys.stderr.flush()
    kept = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(kept, 2)
            os.close(kept)
            if not failed:  # to fd 2 itself: sys.stderr may be no file at all (a notebook kernel's stream)
                held.seek(0)
                os.write(2, held.read())


def _io_reason(error: Exception) -> str:
    """The operating system's words for a failed write, however deep in Orbax/tensorstore it was raised."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    code = re.search(r"os_error_code='?(\d+)", str(error))
    return os.strerror(int(code.group(1))) if code else type(error).__name__


def state_digest(state: Any) -> str:
    """BLAKE2b-128 over every leaf's path, dtype, shape and bytes (host copy of the state)."""
    digest = Digest()
    leaves, _ = jax.tree_util.tree_flatten_with_path(host_value(state))
    for path, leaf in leaves:
        digest.array(leaf, label=f"{_path_name(path)}|")
    return digest.hexdigest()


METADATA_DIGEST = "metadata_digest"  # the metadata's field that holds the digest of all its other fields


def metadata_digest(metadata: dict[str, Any]) -> str:
    """BLAKE2b-128 of a checkpoint's metadata, every field but ``METADATA_DIGEST``, as canonical JSON
    (what Orbax's JSON file reads back: tuples are lists, floats round-trip exactly)."""
    fields = {key: value for key, value in metadata.items() if key != METADATA_DIGEST}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return Digest().raw(text.encode()).hexdigest()


class CheckpointStore:
    """Checkpoints under ``directory/<step>/{state,metadata}``."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(
                f"cannot create checkpoint folder {self.directory}: {error.strerror}; choose a writable --out"
            ) from None
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True),  # a save killed half-way
            item_handlers={"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()},
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        """Save ``state`` at ``step`` with ``metadata`` (plus the state's digest and the metadata's); complete
        or absent."""
        metadata = dict(metadata, state_digest=state_digest(state))
        metadata[METADATA_DIGEST] = metadata_digest(metadata)
        try:
            with _stderr_kept_unless_failed():
                try:
                    self._manager.save(
                        step,
                        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                metadata=ocp.args.JsonSave(metadata)),
                        force=True,
                    )
                    self._manager.wait_until_finished()
                except BaseException:
                    # Let the failed write's outstanding callbacks finish while their output is held.
                    with contextlib.suppress(Exception):
                        self._manager.close()
                    time.sleep(0.5)
                    raise
        except (OSError, ValueError, RuntimeError) as error:  # tensorstore reports I/O failures as ValueError
            if is_peer_failure(error):  # another process of the run died during the collective save
                raise PeerLostError(lost_peers(f"checkpoint step {step} was being saved")) from None
            raise CheckpointError(
                f"could not write checkpoint step {step} in {self.directory} ({_io_reason(error)}); "
                "free disk space or choose another --out, then rerun to resume from the last saved step"
            ) from None

    def restore_latest(
        self, template: Any, accept: Callable[[dict[str, Any]], None] = lambda metadata: None
    ) -> tuple[Any, dict[str, Any]] | None:
        """The newest readable, verified (state, metadata), or None when there is no checkpoint.

        ``template``: a pytree with the state's structure, shapes and dtypes. ``accept(metadata)``
        raises to refuse a checkpoint of another run (called before any state is read).
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                metadata = dict(self._manager.restore(
                    step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"])
            except Exception as error:  # noqa: BLE001 -- unreadable metadata: the step is corrupted
                self._quarantine(step, f"unreadable metadata ({type(error).__name__})")
                continue
            if METADATA_DIGEST not in metadata:
                self._quarantine(step, "its metadata carry no digest: written by an earlier nps, or damaged")
                continue
            if metadata_digest(metadata) != metadata[METADATA_DIGEST]:
                self._quarantine(step, "its metadata do not match the digest saved with them")
                continue
            accept(metadata)
            self._check_layout(step, template)
            try:
                state = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree(template))))["state"]
            except Exception as error:  # noqa: BLE001 -- any unreadable state falls back the same way
                self._quarantine(step, f"unreadable state ({type(error).__name__})")
                continue
            if state_digest(state) != metadata.get("state_digest"):
                self._quarantine(step, "its arrays do not match the digest saved with them")
                continue
            return state, metadata
        if steps:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: all {len(steps)} were corrupted and moved to "
                f"{self.directory}.corrupt/; run the command again to start this model over"
            )
        return None

    def _check_layout(self, step: int, template: Any) -> None:
        """Refuse (never quarantine) a state whose leaves differ from the template's."""
        try:
            saved = _leaf_layout(self._manager.item_metadata(step)["state"])
        except Exception:  # noqa: BLE001 -- no layout to compare: the restore itself will judge the files
            return
        wanted = _leaf_layout(template)
        if saved != wanted:
            differing = sorted(set(saved.items()) ^ set(wanted.items()))[0][0]
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} holds a state of another shape "
                f"({differing}: {saved.get(differing)} saved, {wanted.get(differing)} now); "
                "use another --out folder (the checkpoint verifies: it is kept)"
            )

    def _quarantine(self, step: int, reason: str) -> None:
        """Move a corrupted step aside (every process finds the same corruption; process 0 moves it)."""
        aside_root = Path(f"{self.directory}.corrupt")
        aside, copy = aside_root / str(step), 1
        while aside.exists():  # an earlier quarantined copy is evidence: never overwrite it
            aside, copy = aside_root / f"{step}.{copy}", copy + 1
        if is_primary():
            aside_root.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), aside)
        barrier(f"nps-quarantine-{self.directory}-{step}")
        self._manager.reload()
        if not is_primary():
            return
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is corrupted ({reason}); "
            f"moved it to {aside} and falling back to the previous step",
            stacklevel=3,
        )
