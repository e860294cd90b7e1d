"""Orbax checkpoints of a training state pytree plus JSON metadata.

Orbax writes each step into a temporary folder and renames it when complete, so
a run killed mid-save leaves no half-written step behind. The newest ``keep``
steps are kept; a step that cannot be read (corrupted files) is moved aside to
``<dir>.corrupt/`` with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from nps.errors import CheckpointError

logging.getLogger("absl").setLevel(logging.WARNING)


def abstract_tree(tree):
    """Shape/dtype skeleton of ``tree``, the restore target Orbax checks against."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


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
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any]] | None:
        """The newest readable (state, metadata), or None when there is no checkpoint.

        ``template`` is a pytree with the state's structure, shapes and dtypes.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_tree(template)),
                        metadata=ocp.args.JsonRestore(),
                    ),
                )
                return restored["state"], dict(restored["metadata"])
            except Exception as error:  # noqa: BLE001 -- any unreadable step falls back the same way
                self._quarantine(step, error)
        if steps:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: all {len(steps)} were corrupted and moved to "
                f"{self.directory}.corrupt/; run the command again to start this model over"
            )
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        aside = Path(f"{self.directory}.corrupt") / str(step)
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.move(str(self.directory / str(step)), aside)
        self._manager.reload()
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is unreadable ({type(error).__name__}); "
            f"moved it to {aside} and falling back to the previous step",
            stacklevel=3,
        )
