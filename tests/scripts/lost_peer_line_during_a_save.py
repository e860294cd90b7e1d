"""The watchdog's one line while a checkpoint save holds stderr (fd 2) in a temporary file and the
process then exits: the line must reach the real stderr, not the held file that the exit drops."""

from nps.train.checkpoint import _stderr_kept_unless_failed
from nps.train.distributed import _error_writer, _lost

say = _error_writer()  # made when the watchdog starts, before any save
with _stderr_kept_unless_failed():
    print("held by the save")  # noqa: T201 -- stdout: a marker that the block ran
    _lost(say, "a test")
