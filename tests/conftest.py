"""Test-session settings, applied before any test imports JAX (subprocesses and notebook kernels inherit them).

JAX's persistent compilation cache: the suite compiles many identical programs in separate
processes (CLI runs, a resumed run, the 8-device checks, notebooks); with the cache each is
compiled once per machine.
"""

import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"nps-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def steering_run():
    """The tiny `nps reproduce steering` run that the preference app's tests share (tests/serve_fixture.py)."""
    from serve_fixture import tiny_steering_run

    return tiny_steering_run()
