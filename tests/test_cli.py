"""The `nps` command: one-line errors, --print-config, and resume after SIGKILL (checkpoints and logs)."""

import importlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from event_files import TRAINING_TAGS, steps

from nps.cli import _options, build_parser, main

# A small but complete synthetic run: NP-BTL with three checkpoints.
SMALL = [
    "--set", "models=np_btl",
    "--set", "num_pairs=2000",
    "--set", "train.steps=90",
    "--set", "train.eval_every=30",
    "--set", "train.checkpoint_every=30",
    "--set", "train.batch_size=16",
    "--set", "train.val_tasks=64",
    "--set", "eval.num_tasks=100",
    "--set", "eval.context_sizes=0,1,5",
    "--set", "np_btl.hidden_dim=32",
    "--set", "np_btl.encoder.hidden_dim=32",
    "--set", "np_btl.encoder.latent_dim=16",
]


def nps(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "nps.cli", *args], capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["episodes.max_context=30"], "episodes.max_context=30 exceeds num_targets=20"),
        (["episodes.num_targets=-3"], "episodes.num_targets=-3 must be a positive integer"),
        (["episodes.min_context=-1"], "cannot be negative"),
        (["np_btl.encoder.aggregation=max"], "np_btl.encoder.aggregation='max' is unknown; use one of"),
        (["models=gpt"], "models=('gpt',) must choose from"),
        (["train.stepz=3"], "unknown config field 'train.stepz'"),
        (["log.profile_steps=5"], "log.profile_steps='5' must be START:END with 0 <= START < END, e.g. 100:110"),
    ],
)
def test_bad_configs_give_one_line_errors(overrides, message, capsys, tmp_path):
    args = ["reproduce", "synthetic", "--out", str(tmp_path)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nps: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "results.json").exists()


def test_unwritable_output_folder_is_a_one_line_error(capsys, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert main(["reproduce", "synthetic", "--out", str(blocked / "run"), *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not writable" in err and "--out" in err and "\n" not in err


def test_a_lost_peer_exits_3_however_it_is_noticed(capsys, monkeypatch):
    # A peer lost while joining or during a collective checkpoint save surfaces as PeerLostError,
    # which once took the other errors' exit code 2; the watchdog and a broken collective give 3.
    import nps.train.distributed as distributed

    def never_joins(settings):
        raise distributed.PeerLostError("could not join the run at 127.0.0.1:1 within 1 s (a test)")

    monkeypatch.setattr(distributed, "join_run", never_joins)
    assert main(["reproduce", "synthetic", "--coordinator", "127.0.0.1:1", "--num-processes", "2",
                 "--process-id", "1", *SMALL]) == 3
    assert capsys.readouterr().err == "nps: error: could not join the run at 127.0.0.1:1 within 1 s (a test)\n"


def test_print_config_shows_the_resolved_fields(capsys):
    assert main(["reproduce", "correlation", "--print-config", "--set", "train.steps=5"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["train"]["steps"] == 5 and config["train_rhos"] == [-1.0, -0.7, 0.0, 0.7]


def test_reproduce_builds_the_config_from_its_flags(capsys):
    from nps.experiments import reproduce

    assert reproduce("hh-dpo", model="base", data="uf.jsonl", overrides=["train.steps=3"], print_config=True) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["model"], config["data"], config["train"]["steps"]) == ("base", "uf.jsonl", 3)


# A command's handler hands its flags, as they are parsed, to one library function: every flag must be one
# of that function's keywords, and every keyword it needs a flag (checked without running anything).
@pytest.mark.parametrize("argv, function", [
    (["reproduce", "synthetic"], "nps.experiments:reproduce"),
    (["generate", "--run", "r", "--prompt", "p"], "nps.workflow.generate:generate_steered"),
    (["collect", "--candidates", "c.jsonl", "--profile", "p.jsonl"], "nps.workflow.collect:collect_profile"),
    (["ab", "--run", "r", "--prompts", "p.txt"], "nps.workflow.ab:ab_command"),
    (["compare", "a", "b"], "nps.workflow.compare:compare_command"),
    (["profile", "check", "p.jsonl", "--run", "r"], "nps.workflow.consistency:check_profile_file"),
    (["plan"], "nps.plan:plan_command"),
])
def test_each_command_hands_its_flags_to_one_library_function(argv, function):
    module, name = function.split(":")
    inspect.signature(getattr(importlib.import_module(module), name)).bind(**_options(build_parser().parse_args(argv)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run = nps("reproduce", "synthetic", "--out", str(out), "--quiet", *SMALL)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "results.json" in run.stdout
    return out


def metrics(path: Path):
    models = json.loads((path / "results.json").read_text())["models"]
    return {name: (m["unseen_accuracy"], m["best_step"], m["best_val_nll"], m["history"]) for name, m in models.items()}


def test_corrupted_checkpoint_message_and_fallback(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    for path in (out / "checkpoints" / "np_btl" / "90").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    rerun = nps("reproduce", "synthetic", "--out", str(out), "--quiet", *SMALL)
    assert rerun.returncode == 0, rerun.stderr
    lines = [line for line in rerun.stderr.splitlines() if line.strip()]  # one line, not a page of noise
    assert len(lines) == 1 and lines[0].startswith("nps: warning: checkpoint step 90"), lines
    assert "is corrupted" in lines[0] and "falling back to the previous step" in lines[0], lines
    assert metrics(out) == metrics(finished_run)


EVAL_TAGS = {f"eval/unseen_accuracy/{user}/NC={n}" for user in ("z=0", "z=1", "all") for n in (0, 1, 5)}


def test_a_run_logs_its_curves_evaluation_and_plots(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = steps(finished_run / "logs" / "np_btl")
    assert {tag: curves[tag] for tag in TRAINING_TAGS} == {tag: [30, 60, 90] for tag in TRAINING_TAGS}
    assert curves["perf/steps_per_second"] == [60, 90]  # the first chunk compiled
    assert steps(finished_run / "logs" / "np_btl" / "eval") == {tag: [90] for tag in EVAL_TAGS}
    plots = EventAccumulator(str(finished_run / "logs" / "plots"))
    plots.Reload()
    assert sorted(plots.Tags()["images"]) == ["plots/accuracy_vs_context", "plots/reward_curves"]


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(finished_run, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "nps.cli", "reproduce", "synthetic", "--out", str(out),
                                "--quiet", *SMALL], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "checkpoints" / "np_btl"
    deadline = time.time() + 240
    while not (checkpoints / "60").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "results.json").exists()
    # A kill can land anywhere after a chunk is logged; dropping the checkpoints after step 30 makes
    # it one that landed before they were written: the rerun trains steps 31-90 again, which the
    # killed run has already logged.
    for path in checkpoints.iterdir():
        if path.name[:1].isdigit() and int(path.name.split(".")[0]) > 30:
            shutil.rmtree(path)

    resumed = nps("reproduce", "synthetic", "--out", str(out), "--quiet", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(out) == metrics(finished_run)
    # The curves continue: every step once, as TensorBoard shows them; the killed run's points at
    # 60 (and 90) are still in its file, hidden by the resumed file's start at step 60.
    logs = out / "logs" / "np_btl"
    curves = steps(logs)
    assert {tag: curves[tag] for tag in TRAINING_TAGS} == {tag: [30, 60, 90] for tag in TRAINING_TAGS}
    assert curves["perf/steps_per_second"] == [90]  # the resumed run compiled at 60
    assert steps(logs / "eval") == {tag: [90] for tag in EVAL_TAGS}
    written = [event.step for path in sorted(logs.glob("events.out.tfevents.*"))
               for event in EventFileLoader(str(path)).Load()
               if any(value.tag == "train/loss" for value in event.summary.value)]
    assert written[:2] == [30, 60] and written[-2:] == [60, 90] and len(written) > 3


def test_ctrl_c_prints_one_line_and_a_rerun_ends_with_the_same_numbers(finished_run, tmp_path):
    out = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "nps.cli", "reproduce", "synthetic", "--out", str(out),
                                "--quiet", *SMALL], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "np_btl" / "30").is_dir():
        assert time.monotonic() < deadline and process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    lines = [line for line in process.stderr.read().splitlines() if line.strip()]
    assert lines == [f"nps: interrupted: every checkpoint already saved under {out} is kept; "
                     "run the same command again to resume"]
    assert not (out / "results.json").exists()
    resumed = nps("reproduce", "synthetic", "--out", str(out), "--quiet", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics(out) == metrics(finished_run)


# Issue 23: 1 of 21 Ctrl-Cs went to a garbage-collection callback of JAX's, where Python prints
# "Exception ignored in: <function _xla_gc_callback>" and goes on: the run ended with exit 0. Here the
# interrupt arrives inside that callback every time, under the `nps` program's own entry point.
INTERRUPT_IN_A_GC_CALLBACK = """
import gc, signal, sys, time
import nps.cli

def main(argv=None):
    import jax  # noqa: F401 -- its garbage-collection callback is registered now

    def interrupt(phase, info):
        gc.callbacks.remove(interrupt)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the callbacks of a collection run

    gc.callbacks.insert(0, interrupt)
    gc.collect()
    time.sleep(10)
    print("the interrupt was lost", file=sys.stderr)
    return 0

nps.cli.main = main
nps.cli.entry()
"""


def test_ctrl_c_during_a_garbage_collection_callback_stops_the_program():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", INTERRUPT_IN_A_GC_CALLBACK], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (130, "nps: interrupted: nothing was half-written; run the same "
                                                       "command again\n")
    assert time.monotonic() - started < 10


def handles_interrupts(pid: int) -> bool:
    """Whether the `nps` program's own Ctrl-C handling is in place (it catches SIGALRM; Python alone does not)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGALRM - 1) & 1)


def start_run(out: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nps.cli", "reproduce", "synthetic", "--quiet", *SMALL, "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **env))


def assert_one_interrupted_line(process: subprocess.Popen, moment) -> None:
    code, stderr = process.wait(timeout=120), process.stderr.read()
    said = [line for line in stderr.splitlines() if line.startswith("nps:")]
    assert code == 130 and len(said) == 1 and said[0].startswith("nps: interrupted: "), (moment, code, stderr[-2000:])
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, (moment, stderr[-2000:])


def test_ctrl_c_while_nps_and_jax_start_stops_with_one_line(tmp_path):
    # One process per moment after nps's code starts (the interpreter's own start-up before it, a few tens of
    # milliseconds, is Python's), started together: while Python imports JAX, a C extension that imports numpy
    # turned the interrupt into "ImportError: numpy._core.multiarray failed to import" with a traceback.
    moments = [0.0, 0.05, 0.15, 0.3, 0.5, 0.8, 1.2]
    processes = [start_run(tmp_path / str(i)) for i in range(len(moments))]
    deadline = time.monotonic() + 60
    while not all(handles_interrupts(process.pid) for process in processes):
        assert time.monotonic() < deadline and all(process.poll() is None for process in processes)
        time.sleep(0.002)
    started = time.monotonic()
    for moment, process in zip(moments, processes):
        time.sleep(max(0.0, started + moment - time.monotonic()))
        process.send_signal(signal.SIGINT)
    for moment, process in zip(moments, processes):
        assert_one_interrupted_line(process, moment)


@pytest.mark.slow  # a run per stage, 30-60 s on 2 cores
def test_ctrl_c_at_every_stage_of_a_run_stops_it_with_one_line(tmp_path):
    """Interrupts as XLA compiles each program of a run (no compilation cache; JAX logs each compilation), and
    while the run trains and saves its first checkpoint."""
    stages = {"an eager operation compiles": "Compiling jit(",
              "the training chunk compiles": "Compiling jit(_train_chunk)",
              "validation compiles": "Compiling jit(_validate)"}
    for stage, log_line in stages.items():
        process = start_run(tmp_path / stage.replace(" ", "-"), JAX_ENABLE_COMPILATION_CACHE="false",
                            JAX_LOG_COMPILES="1")
        for line in process.stderr:
            if line.startswith("WARNING") and log_line in line:
                process.send_signal(signal.SIGINT)
                break
        assert_one_interrupted_line(process, stage)
    process = start_run(tmp_path / "saving")
    while not (tmp_path / "saving" / "checkpoints" / "np_btl").is_dir():
        assert process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    assert_one_interrupted_line(process, "the first checkpoint is saved")
