"""One steering run for every test that needs one: notebooks/steering.ipynb, executed top to bottom
once per machine (its CPU settings are small: 63 s alone on 2 cores, with a cold compilation cache).

tests/test_steering.py checks the notebook and its run; the preference app's tests
(tests/test_serve.py) and the CLI's steering commands use the same run. It lives in the system temp
folder under a name keyed by the notebook, every library file, the XLA flags and the versions of
the packages that compute it, so a later test session reuses it only while none of them changed.
Two pytest-xdist workers never build it twice: the builder holds an exclusive lock, the other waits
for the finished run. A test that writes into a run (the A/B scorer) copies it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import tempfile
import time
from pathlib import Path

from notebook_runner import execute_notebook

from nps.files import LockedError, exclusive_lock

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ROOT / "examples" / "steering" / "candidates.jsonl"
NOTEBOOK = "steering.ipynb"


def shaping_inputs() -> list[Path]:
    """What the run depends on: the notebook and every library file (the run goes through most of nps,
    and the notebook's own checks read it, so a change anywhere must not leave a stale run trusted)."""
    return [ROOT / "notebooks" / NOTEBOOK, *sorted((ROOT / "nps").rglob("*.py"))]


# The packages whose versions change the run's numbers (an upgrade must not leave an old run trusted).
COMPUTING_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
OUTPUTS = "notebook_outputs.json"  # written last: the run is complete once it exists


@dataclasses.dataclass(frozen=True)
class SteeringNotebook:
    run: Path  # the notebook's `nps reproduce steering` folder (a cell that fails fails the build)
    images: int  # PNG images it displayed
    printed: str  # everything its cells printed


def steering_notebook(timeout: float = 900.0) -> SteeringNotebook:
    """The executed steering notebook (run here if no session has run it yet)."""
    versions = [f"{name}=={importlib.metadata.version(name)}" for name in COMPUTING_PACKAGES]
    digest = hashlib.blake2b("\n".join([os.environ.get("XLA_FLAGS", ""), *versions]).encode(),  # -O0: other bits
                             digest_size=8)
    for path in shaping_inputs():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    folder = Path(tempfile.gettempdir()) / f"nps-tests-steering-{os.getuid()}-{digest.hexdigest()}"
    deadline = time.monotonic() + timeout
    while not (folder / OUTPUTS).exists():
        try:
            with exclusive_lock(folder.with_name(folder.name + ".build"), "the tests' steering run"):
                if not (folder / OUTPUTS).exists():
                    folder.mkdir(exist_ok=True)
                    outputs = execute_notebook(NOTEBOOK, folder)  # a killed build resumes the run
                    summary = {
                        "images": sum(o.output_type == "display_data" and "image/png" in o.get("data", {})
                                      for o in outputs),
                        "printed": "".join(o.get("text", "") for o in outputs if o.output_type == "stream"),
                    }
                    partial = folder / (OUTPUTS + ".partial")
                    partial.write_text(json.dumps(summary))
                    partial.rename(folder / OUTPUTS)
        except LockedError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for another worker to build {folder}") from None
            time.sleep(1.0)
    summary = json.loads((folder / OUTPUTS).read_text())
    return SteeringNotebook(folder / "steering-run", **summary)
