"""Faults in training runs: altered checkpoints, runs resumed under other settings, two writers and
full disks. Each test failed on the main of 2026-12-01 (issue 12) and passes now. A Ctrl-C and a
corrupted checkpoint's one warning line are tested in tests/test_cli.py, against its finished run."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest

from nps.cli import main
from nps.data.episodes import EpisodeSpec
from nps.data.synthetic import synthetic_task, two_user_pools, uniform_pairs
from nps.errors import CheckpointError, ConfigError
from nps.models.reward import RewardModelConfig, build_reward_model
from nps.train.checkpoint import CheckpointStore, metadata_digest
from nps.train.loop import TrainConfig, fit

SPEC = EpisodeSpec(num_targets=8, max_context=4)
MODEL = RewardModelConfig(kind="btl", hidden_dim=16)
TRAIN = TrainConfig(steps=40, batch_size=8, learning_rate=3e-3, eval_every=20, checkpoint_every=20, val_tasks=32)
# A small synthetic run of the CLI: one model, two checkpoints.
SMALL_RUN = ["--quiet", "--set", "models=btl", "--set", "train.steps=40", "--set", "train.eval_every=20",
             "--set", "train.checkpoint_every=20", "--set", "eval.num_tasks=50", "--set", "num_pairs=2000",
             "--set", "eval.context_sizes=0,1", "--set", "btl.hidden_dim=16"]


@pytest.fixture(scope="module")
def pools():
    return two_user_pools(num_pairs=400, seed=1)


def train(pools, directory, config=TRAIN, **kwargs):
    return fit(build_reward_model(1, MODEL, 0), pools["train"], pools["val"], SPEC, config, directory,
               progress=False, **kwargs)


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def nps_command(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nps.cli", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_a_flipped_byte_in_a_checkpoint_is_caught_and_the_previous_step_used(pools, tmp_path):
    clean = train(pools, tmp_path / "clean")
    train(pools, tmp_path / "run")
    target = largest_file(tmp_path / "run" / "40" / "state")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checkpoint step 40 .* is corrupted"):
        resumed = train(pools, tmp_path / "run")
    chex.assert_trees_all_equal(resumed.params, clean.params)  # retrained 20 → 40 from the good step
    assert (tmp_path / "run.corrupt" / "40").is_dir()


def edit_metadata(path: Path, edit) -> None:
    """Rewrite a checkpoint's metadata with ``edit(metadata)`` applied; its own digest as it was."""
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))


def test_state_that_does_not_match_its_saved_digest_is_not_trusted(pools, tmp_path):
    train(pools, tmp_path)
    metadata = tmp_path / "40" / "metadata" / "metadata"
    other_state = {"state_digest": "0" * 32}  # the metadata's own digest updated too: only the state is off
    edit_metadata(metadata, lambda saved: saved.update(other_state,
                                                       metadata_digest=metadata_digest(saved | other_state)))
    with pytest.warns(UserWarning, match="its arrays do not match the digest saved with them"):
        train(pools, tmp_path)


def history_edit(saved):
    saved["history"][-1]["val_nll"] += 0.03


EDITS = {  # Issue 23: the first two were restored without a word (the edited history reported in results.json)
    "a validation NLL": history_edit,
    "the sampler's step": lambda saved: saved["sampler"].update(step=49),
    "the fingerprint": lambda saved: saved["fingerprint"]["train"].update(learning_rate=0.01),
    "no digest (an earlier nps)": lambda saved: saved.pop("metadata_digest"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_edited_metadata_are_corruption_and_the_previous_step_is_used(pools, tmp_path, edit):
    # A corrupted fingerprint was reported as another configuration, whose advice (--fresh) deleted the good step 20.
    clean = train(pools, tmp_path / "clean")
    train(pools, tmp_path / "run")
    edit_metadata(tmp_path / "run" / "40" / "metadata" / "metadata", EDITS[edit])
    with pytest.warns(UserWarning, match="checkpoint step 40 .* is corrupted \\(its metadata") as warned:
        resumed = train(pools, tmp_path / "run")
    assert len(warned) == 1 and "--fresh" not in str(warned[0].message)
    chex.assert_trees_all_equal(resumed.params, clean.params)  # retrained 20 → 40 from the good step
    assert resumed.history == clean.history and (tmp_path / "run.corrupt" / "40").is_dir()


def test_fewer_steps_than_the_checkpoint_are_refused_not_mislabelled(pools, tmp_path):
    train(pools, tmp_path)
    with pytest.raises(ConfigError, match="train.steps=20, but the checkpoint .* has trained 40 steps; use "
                                          "another --out to train 20 steps, or set train.steps >= 40 \\(the "
                                          "checkpoint is kept\\)"):
        train(pools, tmp_path, dataclasses.replace(TRAIN, steps=20))


def test_extending_a_schedule_that_depends_on_the_steps_is_refused(pools, tmp_path):
    cosine = dataclasses.replace(TRAIN, schedule="cosine", warmup_steps=5)
    train(pools, tmp_path, cosine)
    with pytest.raises(CheckpointError, match="different configuration .*train.steps: 40 in the checkpoint, 60 now"):
        train(pools, tmp_path, dataclasses.replace(cosine, steps=60))
    # A constant schedule may still grow.
    train(pools, tmp_path / "constant")
    assert train(pools, tmp_path / "constant", dataclasses.replace(TRAIN, steps=60)).steps == 60


def test_a_checkpoint_of_other_data_is_refused_even_without_a_run_config(pools, tmp_path):
    train(pools, tmp_path)
    three_users = synthetic_task(uniform_pairs, [lambda y: y[:, 0], lambda y: -y[:, 0], lambda y: y[:, 0] ** 2],
                                 num_pairs=400, seed=1)
    with pytest.raises(CheckpointError, match="different configuration .*pools"):
        fit(build_reward_model(1, MODEL, 0), three_users["train"], three_users["val"], SPEC, TRAIN, tmp_path,
            progress=False)


def test_a_quarantined_copy_is_never_deleted(pools, tmp_path):
    train(pools, tmp_path, dataclasses.replace(TRAIN, steps=20))
    store = CheckpointStore(tmp_path)
    with pytest.warns(UserWarning):
        store._quarantine(20, "test")
    train(pools, tmp_path, dataclasses.replace(TRAIN, steps=20))  # step 20 again
    with pytest.warns(UserWarning):
        CheckpointStore(tmp_path)._quarantine(20, "test")
    assert sorted(p.name for p in (tmp_path.parent / f"{tmp_path.name}.corrupt").iterdir()) == ["20", "20.1"]


def test_a_changed_model_shape_is_a_different_configuration_and_the_checkpoints_stay(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["reproduce", "synthetic", "--out", out, *SMALL_RUN]) == 0
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    capsys.readouterr()
    assert main(["reproduce", "synthetic", "--out", out, *SMALL_RUN, "--set", "btl.hidden_dim=32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "belong to a different configuration (model.hidden_dim: 16 in the checkpoint, 32 now)" in err
    assert "\n" not in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "btl").iterdir()) == ["20", "40"]
    assert not (tmp_path / "run" / "checkpoints" / "btl.corrupt").exists()
    # Back to the first configuration: the run is still there and reports the same numbers.
    assert main(["reproduce", "synthetic", "--out", out, *SMALL_RUN]) == 0
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["models"]["btl"]["unseen_accuracy"] == first["models"]["btl"]["unseen_accuracy"]


def test_context_sizes_that_leave_no_unseen_target_are_a_config_error(tmp_path, capsys):
    assert main(["reproduce", "synthetic", "--out", str(tmp_path), *SMALL_RUN,
                 "--set", "eval.context_sizes=0,19,20"]) == 2
    err = capsys.readouterr().err
    assert "eval.context_sizes=[0, 19, 20] has N^C=20 but the test tasks have num_targets=20" in err
    assert not (tmp_path / "results.json").exists()


def test_a_second_run_on_the_same_folder_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "nps.cli", "reproduce", "synthetic", "--out", str(out),
                              *SMALL_RUN, "--set", "train.steps=100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "btl").is_dir():  # well inside the locked run
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = nps_command("reproduce", "synthetic", "--out", str(out), *SMALL_RUN)
        assert second.returncode == 2
        assert second.stderr.strip() == (f"nps: error: output folder {out} is in use by another nps process "
                                         f"(pid {first.pid}); wait for it to finish, or use another folder")
        assert first.poll() is None  # the first run went on undisturbed
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert not (out / "results.json").exists()


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_step(tmp_path):
    # RLIMIT_FSIZE makes any write past 60 kB fail with EFBIG, as a full disk fails with ENOSPC. The model is
    # large enough (a 256 × 256 layer: 262 kB) that no batching of the checkpoint's files stays under it.
    script = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))\nfrom nps.cli import entry\nentry()\n")
    result = subprocess.run([sys.executable, "-c", script, "reproduce", "synthetic", "--out", str(tmp_path), *SMALL_RUN,
                             "--set", "btl.hidden_dim=256"], capture_output=True, text=True, timeout=300,
                            env=os.environ | {"JAX_ENABLE_COMPILATION_CACHE": "false"})  # its files are large too
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # Which save first crosses the limit depends on how tensorstore batched the writes.
    failed = re.match(r"nps: error: could not write checkpoint step (20|40) in ", lines[0]) if len(lines) == 1 else None
    assert failed, lines
    assert "(File too large); free disk space or choose another --out" in lines[0]
    kept = sorted(p.name for p in (tmp_path / "checkpoints" / "btl").iterdir() if p.name.isdigit())
    assert kept == [str(step) for step in (20,) if step < int(failed[1])]  # the steps before it, whole
    assert not (tmp_path / "results.json").exists()


def test_a_figure_that_fails_half_way_leaves_no_file(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nps.results import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])

    def broken_savefig(target, **kwargs):
        target.write(b"\x89PNG half")  # part of the image reaches the file, then the disk is full
        raise OSError(28, "No space left on device")

    fig.savefig = broken_savefig
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "plot.png")
    assert list(tmp_path.iterdir()) == []
