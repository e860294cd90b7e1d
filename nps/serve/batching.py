"""Generation for many people at once: concurrent requests share one compiled decode call.

A request (a prompt, the person's z or the base model, a seed) joins a queue; a worker thread takes
whatever waits when the model is free, up to ``max_batch`` requests (requests that arrive while a batch
runs form the next one; ``max_wait`` > 0 also waits that long for more once one has come, which only
costs latency when few people are there: docs/benchmarks.md), and generates them as one batch per arm
(the steered policy, with each row's z; the base)
through ``SteeringRun.generate``. Each row samples with a PRNG key of its own seed, so a reply
depends only on its prompt, z and seed, never on the batch it shared (tested). Batches are padded to
a power of two rows and prompts to a multiple of ``WIDTH_STEP`` tokens, so a few programs serve every
mix of requests. At most ``queue_limit`` requests wait; one more is refused at once, and one not
served within ``timeout`` seconds is answered with an error (503) instead of waiting without bound.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from nps.errors import ConfigError
from nps.serve.store import StoreError
from nps.steering_run import check_lengths

WIDTH_STEP = 32  # prompt widths are padded to a multiple of this many tokens


@dataclasses.dataclass
class GenerationRequest:
    """One reply to generate: ``z`` [d] steers the policy; ``base``: the pretrained base (no z)."""

    prompt: str
    z: np.ndarray | None
    seed: int
    base: bool = False
    reply: str | None = None
    error: Exception | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class GenerationBatcher:
    """Batched steered generation for the app (see the module's docstring)."""

    def __init__(self, run, *, max_batch: int = 32, max_wait: float = 0.0, queue_limit: int = 64,
                 timeout: float = 120.0):
        if max_batch < 1 or queue_limit < 1 or max_wait < 0 or timeout <= 0:
            raise ConfigError("max_batch and queue_limit must be at least 1, max_wait ≥ 0 and timeout > 0")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.queue_limit, self.timeout = queue_limit, timeout
        self._pending: list[GenerationRequest] = []
        self._ready = threading.Condition()
        self.batches: list[int] = []  # the number of requests of each batch served (for the benchmark)
        threading.Thread(target=self._serve, name="generation-batcher", daemon=True).start()

    def check(self, prompt: str) -> None:
        """A prompt the run can continue by its longest reply; else a ``ConfigError`` (before it queues)."""
        check_lengths(self.run.base, [self.run.codec.prompt_ids(prompt, "prompt")], "prompt",
                      room=self.run.sampling().max_new_tokens)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """The replies of ``requests`` (served together with whatever else waits), in order."""
        for request in requests:
            self.check(request.prompt)
        with self._ready:
            if len(self._pending) + len(requests) > self.queue_limit:
                raise StoreError(f"the model is busy with {len(self._pending)} other requests; try again in a "
                                 "moment", 503)
            self._pending.extend(requests)
            self._ready.notify()
        deadline = time.monotonic() + self.timeout
        for request in requests:
            if not request.done.wait(max(0.0, deadline - time.monotonic())):
                raise StoreError(f"no reply within {self.timeout:.0f} s (the model is overloaded); try again "
                                 "in a moment", 503)
            if request.error is not None:
                raise request.error
        return [request.reply for request in requests]

    def _take(self) -> list[GenerationRequest]:
        with self._ready:
            while not self._pending:
                self._ready.wait()
            until = time.monotonic() + self.max_wait
            while len(self._pending) < self.max_batch and (left := until - time.monotonic()) > 0:
                self._ready.wait(left)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        return batch

    def _serve(self) -> None:
        while True:
            batch = self._take()
            self.batches.append(len(batch))
            for base in (False, True):
                rows = [request for request in batch if request.base == base]
                if rows:
                    self._run(rows, base)

    def _run(self, rows: list[GenerationRequest], base: bool) -> None:
        try:
            size = 1 << (len(rows) - 1).bit_length()  # a power of two: filler rows repeat the first
            padded = rows + [rows[0]] * (size - len(rows))
            longest = max(len(self.run.codec.prompt_ids(r.prompt)) for r in rows)
            z = None if base else jnp.asarray(np.stack([r.z for r in padded]))
            replies = self.run.generate([r.prompt for r in padded], z, seed=[r.seed for r in padded], base=base,
                                        width=-(-longest // WIDTH_STEP) * WIDTH_STEP)
            for request, reply in zip(rows, replies):
                request.reply = reply
        except Exception as error:  # every request of the batch is answered, with the error
            for request in rows:
                request.error = error
        for request in rows:
            request.done.set()

