"""Ctrl-C always stops the `nps` command with its one line: an interrupt is raised only where it can
propagate.

Python raises ``KeyboardInterrupt`` wherever the main thread runs Python code when SIGINT arrives.
Two kinds of place lose it:

- a garbage-collection callback (JAX registers one, ``_xla_gc_callback``), a ``__del__`` method or a
  weakref callback: an exception cannot leave those, so Python prints "Exception ignored in: ..."
  and goes on, and the command ran to its end (1 of 21 Ctrl-Cs of a BTL run, issue 23);
- an import of a module that a C extension asks for: numpy's ``import_array`` prints the
  interrupt's traceback and raises "ImportError: numpy._core.multiarray failed to import" instead
  (jaxlib's start), and a half-imported module fails later with other errors.

``interrupt_safely`` installs a SIGINT handler that raises only while no C extension module is
being initialised (an interrupt that comes during one is raised once it has started, within
milliseconds) and an unraisable hook that raises an interrupt lost in a callback again; both ask
again after ``RECHECK_SECONDS`` (SIGALRM), from ordinary code.
"""

from __future__ import annotations

import signal
import sys

RECHECK_SECONDS = 0.02  # how soon a deferred or lost interrupt is raised again


def _starting_an_extension(frame) -> bool:
    """Whether a C extension module is being initialised (its loader's frame is on the stack): the code
    that runs now may have been imported by C, which cannot pass an exception on as it was."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib") and \
                type(frame.f_locals.get("self")).__name__ == "ExtensionFileLoader":
            return True
        frame = frame.f_back
    return False


def _interrupt(signum, frame) -> None:
    """SIGINT (Ctrl-C) and the re-check (SIGALRM): ``KeyboardInterrupt``, unless a C extension is starting."""
    if _starting_an_extension(frame):
        signal.setitimer(signal.ITIMER_REAL, RECHECK_SECONDS)
        return
    raise KeyboardInterrupt


def interrupt_safely() -> None:
    """From now on Ctrl-C raises ``KeyboardInterrupt`` only where it can reach the caller (call from the main
    thread)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGALRM, _interrupt)
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, RECHECK_SECONDS)  # not here: raised in this hook, it is lost too
        else:
            previous(unraisable)

    sys.unraisablehook = hook
