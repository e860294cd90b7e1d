"""Every benchmark script imports: a name the library drops breaks this test, not the benchmark in silence
(the scripts themselves run for minutes and are not part of the suite)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_the_benchmark_imports(script):
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # definitions only: each runs under `if __name__ == "__main__"`
    except ModuleNotFoundError as error:  # an optional third-party package (torch) is not installed
        if error.name and error.name.split(".")[0] == "nps":
            raise
        pytest.skip(f"needs {error.name}")
    assert callable(getattr(module, "main", None))
