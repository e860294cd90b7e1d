"""Test-session settings, applied before any test imports JAX (subprocesses and notebook kernels inherit them),
and ``run_script``: a real script file run in a fresh Python on simulated CPU devices.

- JAX's persistent compilation cache, for every program however fast it compiled: the suite compiles
  many identical programs in separate processes (CLI runs, a resumed run, the 8-device checks,
  notebooks), and a fresh process compiles hundreds of eager operations (~30 ms each), the same ones
  in every CLI run; with the cache each is compiled once per machine.
- XLA's CPU code generation set for compile speed in the default (not ``slow``) selection: that suite
  runs tiny models, so XLA compilation is most of its time. ``FAST_COMPILATION``: LLVM -O0, XLA's
  elemental emitters instead of its MLIR fusion emitters, and code generation in one piece rather
  than split for threads (why, and what each saves: docs/design.md, "The test suite's time";
  measured by benchmarks/bench_test_compile_flags.py). None changes an operation, only how fast the
  machine code runs and, through instruction selection (fused multiply-adds), the last bits of some
  results, so every process of a test compiles with the same flags: subprocesses inherit them
  (``script_environment`` and the multi-process launcher keep the session's XLA flags). The ``slow``
  experiment runs, which time and benchmark real work, keep XLA's defaults. The flags are those of
  the pinned jaxlib (constraints.txt): XLA stops at an unknown one.
"""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The tests run on the CPU. libtpu is installed with the test extra (nps plan compiles for TPU topologies);
# without this every JAX process would try to start a TPU backend, take libtpu's machine-wide lock and
# print a page of warnings on a machine that has none.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"nps-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

REPO = Path(__file__).resolve().parent.parent
OPTIMIZATION_FLAG = "--xla_backend_optimization_level"
FAST_COMPILATION = (f"{OPTIMIZATION_FLAG}=0", "--xla_cpu_use_fusion_emitters=false",
                    "--xla_cpu_parallel_codegen_split_count=1")


def pytest_configure(config):
    """XLA's fast-compiling settings unless slow tests are selected or XLA_FLAGS already sets the
    optimisation level (see the module's docstring)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "slow" not in (config.getoption("markexpr") or "").replace("not slow", "") and OPTIMIZATION_FLAG not in flags:
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [flags, *FAST_COMPILATION]))


def script_environment(devices: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child on ``devices`` simulated CPU devices that imports
    this checkout's ``nps`` and the test helpers in tests/ (``env`` entries override)."""
    from nps.train.launch import cpu_devices_environment

    environment = cpu_devices_environment(dict(os.environ), devices)
    paths = [str(REPO), str(REPO / "tests"), *filter(None, [environment.get("PYTHONPATH")])]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment.update(env or {})
    return environment


def run_script(
    script: str | os.PathLike,
    *args,
    devices: int = 1,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``script`` (a path relative to the repository root, e.g. ``tests/scripts/x.py``) with
    ``args`` in a fresh Python from the repository root, on ``devices`` simulated CPU devices.

    The child runs in its own process group; past ``timeout`` seconds the whole group is
    killed and the test fails with the output so far. ``check``: fail the test, with the
    output's tail, unless the script exits 0. Returns the completed process (text output).
    """
    command = [sys.executable, str(REPO / script), *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, env=script_environment(devices, env), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the script and anything it started
        stdout, stderr = process.communicate()
        pytest.fail(f"{script} did not finish within {timeout} s\n{stdout[-3000:]}\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        pytest.fail(f"{script} exited with {result.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return result


@pytest.fixture(name="run_script")
def run_script_fixture():
    """``run_script(script, *args, devices=1, env=None, timeout=300, check=True)``; see ``run_script``."""
    return run_script


@pytest.fixture(scope="session")
def steering_notebook():
    """notebooks/steering.ipynb executed once per machine: its run and what it displayed (tests/steering_fixture.py)."""
    from steering_fixture import steering_notebook

    return steering_notebook()


@pytest.fixture(scope="session")
def steering_run(steering_notebook):
    """The steering notebook's `nps reproduce steering` folder, which the steering and app tests share (read only)."""
    return steering_notebook.run


# A short `nps reproduce hh-dpo` on the tiny offline Qwen2 (nps.lm.tiny) and random UltraFeedback records: the
# notebook's offline stand-in, NP-DPO alone, a few steps.
HH_DPO_SETTINGS = (
    "dtype=float32", "models=np_dpo", "max_length=48", "policy.encoder.hidden_dim=16", "policy.encoder.latent_dim=8",
    "policy.lora.rank=2", "policy.lora.alpha=4", "episodes.num_targets=4", "episodes.max_context=2",
    "eval_num_targets=5", "eval.context_sizes=0,1,3", "eval.num_tasks=8", "train.steps=4", "train.eval_every=2",
    "train.checkpoint_every=2", "train.val_tasks=4", "train.batch_size=2", "reference_batch_size=64",
)


@pytest.fixture(scope="session")
def hh_dpo_run(tmp_path_factory):
    """An hh-dpo run folder (read only) of NP-DPO on a tiny random Qwen2 with a real tokenizer and a chat template."""
    from nps.cli import main
    from nps.data.ultrafeedback import write_random_release
    from nps.lm.tiny import write_tiny_model

    folder = tmp_path_factory.mktemp("hh-dpo")
    write_tiny_model(folder / "tiny-qwen2", "qwen2", seed=4)
    release = write_random_release(folder / "ultrafeedback.jsonl", 160)  # splits large enough for `nps ab`'s scorer
    arguments = ["reproduce", "hh-dpo", "--model", str(folder / "tiny-qwen2"), "--data", str(release),
                 "--out", str(folder / "run")]
    assert main(arguments + [f"--set={setting}" for setting in HH_DPO_SETTINGS]) == 0
    return folder / "run"


# The modules that take longest (subprocess runs of several processes, the app's browser and load
# tests, notebooks) go to the workers first: scheduled last, one of them kept a worker busy for
# minutes after the other had run out of tests.
# test_steering.py builds the shared steering run while test_distributed.py runs on the other worker;
# test_serve.py, which needs that run too, comes after them.
LONGEST_FIRST = ("test_distributed.py", "test_steering.py", "test_serve.py", "test_api_doc.py", "test_notebook.py",
                 "test_hh_dpo.py", "test_hh_dpo_run.py", "test_runs.py", "test_dpo.py", "test_cli.py",
                 "test_model_loading.py", "test_uf_rewards.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: each module keeps its order
