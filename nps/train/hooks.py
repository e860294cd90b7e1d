"""What ``fit`` calls at chunk boundaries: progress, checkpoints, metrics and profiling as hooks.

A chunk is the ``train.eval_every`` steps between two validations, run as compiled scans; the
loop (``nps.train.loop.fit``) only runs chunks, and everything else a run does at their
boundaries is a hook. Every method of ``Hook`` is a no-op; a hook overrides what it needs:

    begin_run(run)              after the run is placed and resumed, before the first chunk
    scan_ends(first, last)      steps strictly inside a chunk where a scan must end (a trace's bounds)
    before_scan(run, length, new)   just before a scan of ``length`` steps (``new``: that length is
                                a compilation of its own); True: the scan is not throughput
    after_scan(run)             just after it
    after_chunk(run, chunk)     with the chunk's metrics on the host (its one transfer)
    end_run(run)                after the last chunk

Hooks run in the order given; ``fit`` puts the caller's first (a metrics log writes a chunk
before its checkpoint is saved, so a resumed run never lacks a point that a checkpoint holds),
then the progress bar, then checkpointing. Hooks never touch the device inside a chunk, except a
profiler's wait before and after its trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import jax
from tqdm.auto import tqdm

from nps.accelerator import peak_flops_per_second
from nps.train.checkpoint import CheckpointStore
from nps.train.distributed import is_primary

if TYPE_CHECKING:
    from nps.train.loop import Chunk, Run


class Hook:
    """A no-op at every boundary; see the module docstring for when each is called."""

    def begin_run(self, run: Run) -> None:
        pass

    def scan_ends(self, first: int, last: int) -> Iterable[int]:
        return ()

    def before_scan(self, run: Run, length: int, new: bool) -> bool:
        return False

    def after_scan(self, run: Run) -> None:
        pass

    def after_chunk(self, run: Run, chunk: Chunk) -> None:
        pass

    def end_run(self, run: Run) -> None:
        pass


class Progress(Hook):
    """A progress bar of the run's steps with the last validation NLL (process 0, when ``enabled``)."""

    def __init__(self, description: str, enabled: bool = True):
        self.description, self.enabled, self.bar = description, enabled, None

    def begin_run(self, run: Run) -> None:
        steps = run.config.steps
        self.bar = tqdm(total=steps, initial=min(run.step, steps), desc=self.description,
                        disable=not (self.enabled and is_primary()), leave=False)

    def after_chunk(self, run: Run, chunk: Chunk) -> None:
        self.bar.update(chunk.length)
        self.bar.set_postfix(val_nll=f"{chunk.metrics['val_nll']:.4f}")

    def end_run(self, run: Run) -> None:
        self.bar.close()


class Checkpointing(Hook):
    """Every ``train.checkpoint_every`` steps, and at the last, the state saved with the run's
    fingerprint, its history and the sampler's position (its step: the data depend on it alone)."""

    def __init__(self, store: CheckpointStore, fingerprint: dict[str, Any]):
        self.store, self.fingerprint = store, fingerprint

    def after_chunk(self, run: Run, chunk: Chunk) -> None:
        config = run.config
        if chunk.step % config.checkpoint_every == 0 or chunk.step == config.steps:
            self.store.save(chunk.step, run.state, {"fingerprint": self.fingerprint, "history": run.history,
                                                    "sampler": {"seed": config.seed, "step": chunk.step}})


class ChunkMetrics(Hook):
    """Each chunk's metrics to ``callback(step, metrics)`` on process 0 (a metrics log): train loss
    and accuracy, gradient norm and learning rate (chunk means; the rate at its last step),
    validation NLL and unseen accuracy, the devices' peak memory where the backend reports it; for
    chunks that compiled nothing and were not profiled, also steps/s, tokens/s (token models) and
    MFU where the devices' peak FLOP/s is known (``nps.accelerator.CHIPS``)."""

    def __init__(self, callback: Callable[[int, dict[str, float]], None]):
        self.callback, self.peak, self.flops_per_step = callback, None, None

    def begin_run(self, run: Run) -> None:
        mesh = run.program.mesh
        self.peak = peak_flops_per_second(mesh.devices.flat if mesh is not None else jax.devices()[:1])
        if self.peak is not None and is_primary():  # traced once, before any timed chunk
            self.flops_per_step = run.step_flops()

    def after_chunk(self, run: Run, chunk: Chunk) -> None:
        if not is_primary():
            return
        throughput = {}
        if chunk.timed:
            throughput["steps_per_second"] = chunk.length / chunk.seconds
            if chunk.tokens is not None:
                throughput["tokens_per_second"] = chunk.tokens * chunk.length / chunk.seconds
            if self.flops_per_step is not None:
                throughput["mfu"] = self.flops_per_step * chunk.length / chunk.seconds / self.peak
        self.callback(chunk.step, chunk.metrics | throughput | peak_memory())


def peak_memory() -> dict[str, float]:
    """The largest peak device memory in use (bytes), where the backend reports it (GPU, TPU; not CPU)."""
    stats = [device.memory_stats() for device in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return {"peak_memory_bytes": float(max(peaks))} if peaks else {}
