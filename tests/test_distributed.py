"""Multi-process runs: two processes × two CPU devices (gloo collectives on 127.0.0.1): one is killed
after the first checkpoint, the other must stop by itself with one line, and both are launched
again, against one uninterrupted process × four devices; process 0 alone logging and tracing (the
relaunch profiles steps 20-39, its only chunk, whose program process 0 finds in the compilation cache
from the first launch: the numbers stay those of the unprofiled one-process run.
tests/test_logging.py splits a chunk at a window).

With `train.gradient_sum=ordered` the data-parallel update sums every device's gradient in device
order after an exact all-gather (`nps.train.loop._data_parallel_loss_and_grads`), so the two layouts
give bit-identical numbers: the bound these tests hold is zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from event_files import steps

from nps.train.launch import cpu_devices_environment, free_port, process_environment

# train.gradient_sum=ordered: the layouts' bit-identity needs the ordered sum (XLA's all-reduce, the default,
# adds in an order that follows the topology).
SYNTHETIC = ["reproduce", "synthetic", "--quiet", "--set", "models=np_btl", "--set", "train.steps=40",
             "--set", "train.gradient_sum=ordered",
             "--set", "train.eval_every=20", "--set", "train.checkpoint_every=20", "--set", "train.val_tasks=64",
             "--set", "num_pairs=2000", "--set", "eval.num_tasks=100", "--set", "eval.context_sizes=0,1,5"]
STEERING = ["reproduce", "steering", "--quiet", "--set", "models=np_dpo", "--set", "corpus_size=2000",
            "--set", "train.gradient_sum=ordered",
            "--set", "pretrain.steps=40", "--set", "num_prompts=800", "--set", "train.steps=20",
            "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10", "--set", "train.val_tasks=8",
            "--set", "eval.num_tasks=16", "--set", "eval.context_sizes=0,3", "--set", "generations_per_point=4",
            "--set", "continuum_points=2"]
TIMEOUT = 600


def one_process(devices: int, args: list[str], out: Path) -> dict:
    env = cpu_devices_environment(dict(os.environ), devices)  # the session's other XLA flags kept, as launch does
    result = subprocess.run([sys.executable, "-m", "nps.cli", *args, "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def two_processes(args: list[str], out: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "nps.cli", "launch", "--local", "2", "--cpu-devices", "2", "--",
                             *args, "--out", str(out)], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def start_processes(args: list[str], out: Path) -> list[subprocess.Popen]:
    port = free_port()  # a silent peer counts as gone after 8 s (--peer-timeout; 20 by default)
    return [subprocess.Popen([sys.executable, "-m", "nps.cli", *args, "--out", str(out), "--peer-timeout", "8"],
                             env=process_environment(index, 2, port, cpu_devices=2, gpus_per_process=None),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for index in range(2)]


def wait_for(path: Path, processes: list[subprocess.Popen], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "the run ended early"
        time.sleep(0.05)


def trained_models(results: dict) -> dict:
    """What a run reports about its models (not its wall-clock times nor its training curves)."""
    return {name: {key: value for key, value in model.items()
                   if key not in ("wall_clock_seconds", "train_steps_per_second", "history")}
            for name, model in results["models"].items()}


def assert_same_numbers(a: dict, b: dict) -> None:
    """Bit-identical models, evaluations and training curves."""
    assert trained_models(a) == trained_models(b)
    for name in a["models"]:
        assert a["models"][name]["history"] == b["models"][name]["history"]


@dataclasses.dataclass
class Stopped:
    """How process 0 ended after its peer was SIGKILLed: exit code, seconds it took, what it printed."""

    code: int
    seconds: float
    stderr: str


@pytest.fixture(scope="module")
def two_process_synthetic(tmp_path_factory):
    """A two-process run whose process 1 is SIGKILLed after the first checkpoint (process 0 must stop
    by itself), then the same launch again, profiling steps 20-39: its results, its output folder
    and how process 0 stopped."""
    out = tmp_path_factory.mktemp("two") / "run"
    processes = start_processes(SYNTHETIC, out)
    try:
        wait_for(out / "checkpoints" / "np_btl" / "20", processes)
        processes[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        code = processes[0].wait(timeout=90)
        stopped = Stopped(code, time.monotonic() - start, processes[0].stderr.read())
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=60)
    assert not (out / "results.json").exists()
    return two_processes([*SYNTHETIC, "--set", "log.profile_steps=20:40"], out), out, stopped


def test_two_killed_and_relaunched_processes_give_the_numbers_of_one_process_with_four_devices(
        two_process_synthetic, tmp_path):
    four_devices = one_process(4, SYNTHETIC, tmp_path / "run")  # uninterrupted, not profiled
    assert_same_numbers(two_process_synthetic[0], four_devices)


def test_process_zero_alone_writes_the_log_and_the_trace(two_process_synthetic):
    logs = two_process_synthetic[1] / "logs" / "np_btl"
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2  # one writer per launch: process 0's
    assert steps(logs)["train/loss"] == [20, 40]  # what the killed launch logged after step 20 is hidden
    assert len(list(logs.glob("plugins/profile/*/*.xplane.pb"))) == 1  # one host's trace


@pytest.mark.slow  # two small steering runs, 2 minutes on 2 cores
def test_np_dpo_on_two_processes_matches_one_process_with_four_devices(tmp_path):
    two = two_processes(STEERING, tmp_path / "two")
    four = one_process(4, STEERING, tmp_path / "four")
    assert_same_numbers(two, four)
    assert two["win_rates"] == four["win_rates"] and two["continuum"] == four["continuum"]


def test_a_process_whose_peer_dies_stops_with_one_line(two_process_synthetic):
    stopped = two_process_synthetic[2]
    assert stopped.code == 3 and stopped.seconds < 30, (stopped.code, stopped.seconds)  # the watchdog's 8 s
    # JAX's C++ runtime may log its own view too, depending on whether its heartbeat or nps's
    # watchdog notices the loss first (lines such as "E1201 12:00:00.0 123 coordination_service.cc:1549]
    # ...", some of them continued over several lines); nps says one line and no traceback.
    said = [line for line in stopped.stderr.splitlines() if line.startswith("nps:")]
    assert len(said) == 1 and said[0].startswith("nps: error: process 0 of 2 lost its peers"), stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr


def test_processes_started_with_different_configurations_refuse_before_any_step(tmp_path):
    # Issue 23: with another learning rate in process 1 both exited 0 (results.json recorded process 0's rate
    # for a model trained with a mixture); with 200 vs 300 steps both hung until killed.
    port, out = free_port(), tmp_path / "run"
    differing = [[], ["--set", "train.learning_rate=0.01", "--set", "train.steps=60"]]
    processes = [subprocess.Popen([sys.executable, "-m", "nps.cli", *SYNTHETIC, *differing[index], "--out", str(out),
                                   "--join-timeout", "30"],
                                  env=process_environment(index, 2, port, cpu_devices=1, gpus_per_process=None),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for index in range(2)]
    try:
        ended = [(p.wait(timeout=90), p.stderr.read()) for p in processes]
    finally:
        for process in processes:
            process.kill()
    for code, stderr in ended:
        said = [line for line in stderr.splitlines() if line.startswith("nps:")]
        assert code == 2 and len(said) == 1 and "Traceback" not in stderr, stderr
        assert said[0] == ("nps: error: the processes of this run were started differently (configuration): process "
                           "1 differs from process 0 in config.train.learning_rate, config.train.steps; start every "
                           "process with the same command, data and nps"), said
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


def test_the_lost_peer_line_gets_out_while_a_checkpoint_save_holds_stderr(run_script):
    # Found by the test above: process 0 stopped in 20 s but said nothing, its line held by a save.
    result = run_script("tests/scripts/lost_peer_line_during_a_save.py", check=False, env={"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 3 and result.stdout == "held by the save\n"
    assert result.stderr.startswith("nps: error: process 0 of 1 lost its peers (a test)"), result.stderr
