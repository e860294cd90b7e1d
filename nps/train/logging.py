"""What makes a long run watchable: training curves to TensorBoard (or W&B), evaluation tables as
scalars, plots as images, ``jax.profiler`` traces of chosen steps, and the FLOPs behind MFU.

Layout: a run writes under ``<out>/logs/``, one TensorBoard run per model (``logs/<model>``:
training curves and profile traces), its evaluation beside it (``logs/<model>/eval``) and the
experiment's plots (``logs/plots``); ``tensorboard --logdir <out>/logs`` shows them side by side.
Tags (README, "Watching a run"):

    train/loss  train/accuracy  train/grad_norm  train/learning_rate   chunk means (rate: last step)
    val/nll  val/unseen_accuracy                                      after each chunk
    perf/steps_per_second  perf/tokens_per_second  perf/mfu  perf/peak_memory_bytes
    eval/unseen_accuracy/<user type>/NC=<N^C>                         at the last training step
    plots/<plot file name>                                            images

Metrics reach a writer once per chunk of ``train.eval_every`` steps, from the same host transfer
that feeds the progress bar (``RunLog.hooks``: ``fit``'s hooks); nothing here touches the device in the step loop.
Only process 0 of a multi-process run writes anything.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax

from nps.errors import ConfigError, invalid
from nps.train.distributed import is_primary
from nps.train.hooks import ChunkMetrics, Hook

BACKENDS = ("tensorboard", "wandb", "none")

# fit's chunk metric names (``ChunkMetrics``) -> tags. A metric missing here is written under its own name (never dropped).
TAGS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "grad_norm": "train/grad_norm",
    "learning_rate": "train/learning_rate",
    "val_nll": "val/nll",
    "val_unseen_accuracy": "val/unseen_accuracy",
    "steps_per_second": "perf/steps_per_second",
    "tokens_per_second": "perf/tokens_per_second",
    "mfu": "perf/mfu",
    "peak_memory_bytes": "perf/peak_memory_bytes",
}


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where a run's metrics go (``--set log.backend=...``) and which steps to profile."""

    # "tensorboard" (event files, no TensorFlow), "wandb" (pip install 'nps[wandb]') or "none"
    backend: str = "tensorboard"
    # "START:END": a jax.profiler trace of the steps START..END-1 (END - START steps) into logs/<model>.
    profile_steps: str = ""
    wandb_project: str = "nps"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise invalid("backend", self.backend, f"is unknown; use one of {list(BACKENDS)}")
        if self.backend == "wandb" and importlib.util.find_spec("wandb") is None:
            raise invalid("backend", self.backend, "needs the wandb package: pip install 'nps[wandb]' (or use "
                          "'tensorboard')")
        self.profile_range()

    def profile_range(self) -> tuple[int, int] | None:
        """(START, END) of ``profile_steps``, or None when no trace is asked for."""
        if not self.profile_steps:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", self.profile_steps)
        if not match or int(match[1]) >= int(match[2]):
            raise invalid("profile_steps", self.profile_steps,
                          "must be START:END with 0 <= START < END, e.g. 100:110 for ten steps (or empty for no trace)")
        return int(match[1]), int(match[2])


@dataclasses.dataclass(eq=False)
class ProfileWindow(Hook):
    """A ``jax.profiler`` trace of the steps ``start``..``end - 1``, written under ``directory``: a
    hook of ``fit`` that ends scans at its bounds (with no validation between them, so the run
    computes what an unprofiled one does) and compiles a scan length new to the run before the
    trace starts, so the trace holds the steps' work only.

    Every process of a multi-process run holds the window (``fit`` splits its scans at the same
    steps everywhere: the processes must run the same programs); process 0 alone traces.
    """

    start: int
    end: int
    directory: Path
    active: bool = True  # False once ``begin_run`` finds the run past the window

    def applies(self, trained: int, steps: int) -> bool:
        """Whether a run at step ``trained`` of ``steps`` still reaches the window: one past the
        run's end is a config error; one already trained (a resumed run) is a warning and no trace."""
        if self.end > steps:
            raise ConfigError(f"log.profile_steps={self.start}:{self.end} ends after train.steps={steps}; choose "
                              f"steps inside the run, e.g. {max(steps - 10, 0)}:{steps}", "log.profile_steps")
        if trained > self.start:
            if is_primary():
                warnings.warn(f"log.profile_steps={self.start}:{self.end}: {self.directory.name} resumed at step "
                              f"{trained}, after the window; no trace taken (use a later window, or --fresh)",
                              stacklevel=3)
            return False
        return True

    def begin(self) -> None:
        if is_primary():
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)

    def finish(self) -> None:
        if is_primary():
            jax.profiler.stop_trace()

    # -- as a hook of fit --
    def begin_run(self, run) -> None:
        self.active = self.applies(run.step, run.config.steps)

    def scan_ends(self, first: int, last: int) -> tuple[int, ...]:
        return (self.start, self.end) if self.active else ()

    def before_scan(self, run, length: int, new: bool) -> bool:
        if not (self.active and run.step == self.start):
            return False
        if new:  # compiled before the trace starts
            run.precompile(length)
        jax.block_until_ready(run.state)
        self.begin()
        return True  # the profiler slows what it records

    def after_scan(self, run) -> None:
        if self.active and run.step == self.end:
            jax.block_until_ready(run.state)
            self.finish()


def training_scalars(metrics: Mapping[str, float]) -> dict[str, float]:
    """``fit``'s per-chunk metrics under their tags (the step is the points' x axis, not a tag)."""
    return {TAGS.get(name, name): value for name, value in metrics.items() if name != "step"}


def evaluation_scalars(accuracy: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """An unseen-accuracy table ({N^C: {user type: {"mean", ...}}}) as ``eval/unseen_accuracy/<user>/NC=<n>``."""
    return {f"eval/unseen_accuracy/{user}/NC={size}": cell["mean"]
            for size, by_user in accuracy.items() for user, cell in by_user.items()}


class RunLog:
    """One run's log folder: a model's training curves and evaluation, or an experiment's plots.

    Writers open on their first point, so a run that writes nothing leaves no files. Use as a
    context manager (or call ``close``). Every point is on disk when the call returns: a
    checkpoint that follows a chunk never holds steps its log lacks.
    """

    def __init__(self, config: LogConfig, directory: str | Path, *, name: str | None = None,
                 run_config: Mapping[str, Any] | None = None):
        self.config = config
        self.directory = Path(directory)
        self.name = name or self.directory.name
        self.active = config.backend != "none" and is_primary()  # process 0 alone writes
        self._run_config = dict(run_config or {})
        self._writers: dict[str, Any] = {}

    def profile_window(self) -> ProfileWindow | None:
        """The trace ``log.profile_steps`` asks for (on every process), a hook of ``fit``."""
        bounds = self.config.profile_range()
        return None if bounds is None else ProfileWindow(*bounds, self.directory)

    def hooks(self) -> list[Hook]:
        """What ``fit`` calls for this log: its metrics per chunk (where this process writes) and the
        profile trace (on every process)."""
        window = self.profile_window()
        return [*([ChunkMetrics(self.on_chunk)] if self.active else []), *([window] if window else [])]

    def on_chunk(self, step: int, metrics: Mapping[str, float]) -> None:
        """A chunk's metrics (``ChunkMetrics``'s callback) as training scalars."""
        self._write("train", step, training_scalars(metrics))

    def evaluation(self, step: int, accuracy: Mapping[str, Any]) -> None:
        """The unseen-accuracy table of the model trained ``step`` steps."""
        self._write("eval", step, evaluation_scalars(accuracy))

    def images(self, step: int, paths: Sequence[Path]) -> None:
        """PNG files as images ``plots/<file name>``."""
        if self.active and paths:
            self._guarded(lambda: self._writer("train").images(step, {f"plots/{Path(p).stem}": Path(p) for p in paths}))

    def _write(self, part: str, step: int, scalars: dict[str, float]) -> None:
        if self.active and scalars:
            self._guarded(lambda: self._writer(part).scalars(step, scalars))

    def _guarded(self, write: Callable[[], None]) -> None:
        """A log that cannot be written (a full disk, W&B unreachable) must not end an hours-long run:
        one warning line, and this log writes nothing more."""
        try:
            write()
        except OSError as error:
            self.active = False
            warnings.warn(f"{self.directory}: cannot write the log ({error}); logging to it stopped, training "
                          "goes on", stacklevel=4)

    def _writer(self, part: str):
        if self.config.backend == "wandb":
            part = "train"  # one W&B run holds the model's curves and its evaluation
        if part not in self._writers:
            if self.config.backend == "wandb":
                self._writers[part] = _WandbWriter(self.directory, self.name, self.config.wandb_project,
                                                   self._run_config)
            else:
                # TensorBoard: evaluation in a sub-run, so that re-evaluating a finished model (a rerun)
                # replaces its points without touching the training curves (see _TensorBoardWriter).
                self._writers[part] = _TensorBoardWriter(self.directory / "eval" if part == "eval" else self.directory)
        return self._writers[part]

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_file_ids = itertools.count()


class _TensorBoardWriter:
    """TensorBoard event files, written with TensorBoard's own record writer and protos (no TensorFlow).

    Synchronous and flushed per call, so every point is in the file when the call returns
    (TensorBoard's and tensorboardX's queued writers flush from a thread every few seconds or
    minutes: a SIGKILL could lose steps that a checkpoint already covers, which a resumed run
    never writes again).

    Resume without duplicates: a file begins with a ``SessionLog.START`` event at the first step
    its writer writes (what tensorboardX calls ``purge_step``). TensorBoard's readers (the event
    accumulator and the fast data server alike) then hide every point that earlier files of the
    folder hold at or after that step. A run writes increasing chunk ends and a resumed run's
    first chunk end is the first one after its checkpoint, so exactly the steps it trains again
    are replaced; a ``--fresh`` run replaces the whole curve.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._records = None

    def _open(self, step: int) -> None:
        import socket

        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.directory.mkdir(parents=True, exist_ok=True)
        # Readers take a folder's files in name order: the time comes first. The pid and a counter
        # keep two writers of one second apart, and "x" never truncates another writer's file.
        while self._records is None:
            name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}"
            try:
                self._records = RecordWriter(open(self.directory / name, "xb"))
            except FileExistsError:
                continue
        self._event(Event(file_version="brain.Event:2"))
        self._event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))

    def _event(self, event) -> None:
        event.wall_time = time.time()
        self._records.write(event.SerializeToString())

    def _write(self, step: int, values: list) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self._records is None:
            self._open(step)
        self._event(Event(step=step, summary=Summary(value=values)))
        self._records.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(step, [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])

    def images(self, step: int, images: Mapping[str, Path]) -> None:
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = []
        for tag, path in images.items():
            with Image.open(path) as image:  # the file's PNG bytes are stored; only its size is read
                width, height, channels = *image.size, len(image.getbands())
            values.append(Summary.Value(tag=tag, image=Summary.Image(
                height=height, width=width, colorspace=channels, encoded_image_string=path.read_bytes())))
        self._write(step, values)

    def close(self) -> None:
        if self._records is not None:
            self._records.close()
            self._records = None


class _WandbWriter:
    """One W&B run per log folder (offline with ``WANDB_MODE=offline``; ``wandb sync`` uploads it).

    The run's id is kept in ``<folder>/wandb-run-id``, so a resumed nps run continues the same W&B
    run. W&B refuses steps below its latest (a warning): the steps a resumed run trains again keep
    their first values, which are the same bit for bit except the perf/ tags.
    """

    def __init__(self, directory: Path, name: str, project: str, run_config: Mapping[str, Any]):
        self.directory, self.name, self.project, self.run_config = directory, name, project, run_config
        self._run = None

    def _open(self):
        import wandb

        self.directory.mkdir(parents=True, exist_ok=True)
        id_file = self.directory / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:8]  # W&B's id alphabet: lowercase letters and digits
            id_file.write_text(run_id)
        try:
            self._run = wandb.init(
                project=self.project, name=self.name, group=self.directory.parent.parent.name, id=run_id,
                resume="allow", dir=self.directory, config=dict(self.run_config),
                settings=wandb.Settings(silent=True, console="off"),
            )
        except wandb.Error as error:  # e.g. no network and no WANDB_MODE=offline
            raise OSError(f"W&B: {error}; set WANDB_MODE=offline to log to disk") from None
        return self._run

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        (self._run or self._open()).log(dict(values), step=step)

    def images(self, step: int, images: Mapping[str, Path]) -> None:
        import wandb

        (self._run or self._open()).log({tag: wandb.Image(str(path)) for tag, path in images.items()}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


# -- MFU: the step's FLOPs (the devices' peak: nps.accelerator.peak_flops_per_second) -------------

def matmul_flops(fn: Callable, *args, **kwargs) -> float:
    """Matrix-multiply FLOPs of one call of ``fn`` (2·M·N·K per ``dot_general``), counted from its jaxpr.

    A ``scan`` body counts ``length`` times. XLA's ``cost_analysis()`` counts every loop body once
    (measured on this code: a chunk of 1, 2 or 10 steps reports the same FLOPs), which would
    undercount the decoder, whose layers are one scan, by its number of layers. A ``while`` body
    counts once (its trip count is not static; here: the episode sampler's index loop, no matmuls),
    a ``cond`` its largest branch. Matmuls recomputed under ``jax.checkpoint`` count as executed.
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _sub_jaxprs(value) -> list:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for item in value for j in _sub_jaxprs(item)]
    return []


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            depth = math.prod(lhs[d] for d in lhs_contracting)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * depth
            continue
        inner = [_jaxpr_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value)]
        if eqn.primitive.name == "cond":
            total += max(inner, default=0.0)
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total
