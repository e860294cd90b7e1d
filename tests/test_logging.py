"""Watching runs: TensorBoard scalars read back with TensorBoard's own reader, profile traces, MFU,
W&B offline, process 0 alone writing. (The SIGKILL-and-resume case is in test_cli.py.)"""

import dataclasses
import struct
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import pytest
from event_files import TRAINING_TAGS, scalars
from small_task import MODEL, SPEC, TRAIN

from nps.accelerator import peak_flops_per_second
from nps.config import apply_overrides, config_from_dict
from nps.data.synthetic import two_user_pools
from nps.errors import ConfigError
from nps.experiments.synthetic import SyntheticConfig
from nps.models.reward import build_reward_model
from nps.results import ExperimentRun
from nps.train import logging as run_logging
from nps.train.evaluate import EvalConfig
from nps.train.hooks import ChunkMetrics
from nps.train.logging import LogConfig, RunLog, matmul_flops
from nps.train.loop import fit


@pytest.fixture(scope="module")
def pools():
    return two_user_pools(num_pairs=2000, seed=1)


def test_bad_log_settings_are_one_line_naming_the_field():
    with pytest.raises(ConfigError, match=r"log\.profile_steps='10-20' must be START:END with 0 <= START < END, "
                                          r"e\.g\. 100:110"):
        apply_overrides(SyntheticConfig(), ["log.profile_steps=10-20"])
    with pytest.raises(ConfigError, match=r"log\.profile_steps='20:10' must be START:END"):
        config_from_dict(LogConfig, {"profile_steps": "20:10"}, "log")
    with pytest.raises(ConfigError, match=r"log\.backend='csv' is unknown; use one of \['tensorboard', 'wandb'"):
        apply_overrides(SyntheticConfig(), ["log.backend=csv"])
    assert apply_overrides(SyntheticConfig(), ["log.profile_steps=100:110"]).log.profile_range() == (100, 110)


def test_training_curves_and_evaluation_read_back_with_tensorboards_reader(pools, tmp_path):
    run = ExperimentRun("test", None, tmp_path, EvalConfig(context_sizes=(0, 2), num_tasks=40), progress=False)
    fitted, entry = run.fit_and_evaluate_reward_model("np_btl", MODEL, pools, data_identity={}, train=TRAIN,
                                                      episodes=SPEC, user_names=["z=0", "z=1"])
    curves = scalars(tmp_path / "logs" / "np_btl")
    chunk_ends = [20, 40, 60]
    for tag in TRAINING_TAGS:
        assert [step for step, _ in curves[tag]] == chunk_ends, tag
    assert [v for _, v in curves["val/nll"]] == pytest.approx([h["val_nll"] for h in entry["history"]])
    # Throughput only for chunks that compiled nothing: the first chunk compiles its scan.
    assert [step for step, _ in curves["perf/steps_per_second"]] == [40, 60]
    assert "perf/mfu" not in curves and "perf/tokens_per_second" not in curves  # CPU: no peak; not a token model
    evaluation = scalars(tmp_path / "logs" / "np_btl" / "eval")
    assert set(evaluation) == {f"eval/unseen_accuracy/{user}/NC={n}" for user in ("z=0", "z=1", "all") for n in (0, 2)}
    assert evaluation["eval/unseen_accuracy/all/NC=2"] == [
        (60, pytest.approx(entry["unseen_accuracy"]["2"]["all"]["mean"]))]


def test_profile_steps_trace_those_steps_and_change_nothing(pools, tmp_path):
    """A window that starts inside a chunk splits its scan (30:40 of the chunk 20..40) but adds no
    validation: the run ends with the parameters and history of an unprofiled one, and the trace is on disk."""
    train = dataclasses.replace(TRAIN, steps=40)
    plain = fit(build_reward_model(1, MODEL, 0), pools["train"], pools["val"], SPEC, train, progress=False)
    window = run_logging.ProfileWindow(30, 40, tmp_path / "np_btl")
    chunks = []
    profiled = fit(build_reward_model(1, MODEL, 0), pools["train"], pools["val"], SPEC, train, progress=False,
                   hooks=[ChunkMetrics(lambda step, metrics: chunks.append((step, metrics))), window])
    chex.assert_trees_all_equal(profiled.params, plain.params)
    # The same parameters, so the same losses; a norm reduced inside another program may differ in the last bit.
    assert [h["step"] for h in profiled.history] == [20, 40]
    assert profiled.history == [pytest.approx(h, rel=1e-6) for h in plain.history]
    assert all("steps_per_second" not in metrics for _, metrics in chunks)  # compiled, then profiled
    traces = list((tmp_path / "np_btl" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 10_000
    assert list(traces[0].parent.glob("perfetto_trace.json.gz"))  # for ui.perfetto.dev


def test_profile_window_outside_the_run_is_an_error_or_a_warning(pools, tmp_path):
    window = run_logging.ProfileWindow(50, 70, tmp_path / "np_btl")
    with pytest.raises(ConfigError, match=r"log\.profile_steps=50:70 ends after train\.steps=60; choose steps "
                                          r"inside the run, e\.g\. 50:60"):
        window.applies(0, 60)
    with pytest.warns(UserWarning, match=r"np_btl resumed at step 60, after the window; no trace taken"):
        assert not run_logging.ProfileWindow(20, 30, tmp_path / "np_btl").applies(60, 100)


def test_matmul_flops_count_scan_bodies_by_their_length():
    def step(x, w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=3)[0].sum()

    x, w = jnp.ones((4, 5)), jnp.ones((5, 5))
    assert matmul_flops(step, x, w) == 3 * 2 * 4 * 5 * 5
    # The gradient: one forward and two backward matmuls per scanned step.
    assert matmul_flops(jax.grad(step, argnums=1), x, w) == 3 * 3 * 2 * 4 * 5 * 5


def test_mfu_where_the_devices_peak_is_known(pools, monkeypatch):
    from nps.train import hooks

    kind = lambda name: type("Device", (), {"device_kind": name})()  # noqa: E731
    assert peak_flops_per_second([kind("NVIDIA H100 80GB HBM3")] * 8) == 8 * 989e12
    assert peak_flops_per_second([kind("TPU v5 lite")]) == 197e12
    assert peak_flops_per_second([kind("NVIDIA H100 PCIe")]) == 756e12
    assert peak_flops_per_second(jax.devices("cpu")) is None

    monkeypatch.setattr(hooks, "peak_flops_per_second", lambda devices: 1e12)  # pretend the CPU is a known chip
    chunks = []
    fit(build_reward_model(1, MODEL, 0), pools["train"], pools["val"], SPEC, dataclasses.replace(TRAIN, steps=40),
        progress=False, hooks=[ChunkMetrics(lambda step, metrics: chunks.append(metrics))])
    assert "mfu" not in chunks[0]  # the first chunk compiled
    assert 0 < chunks[1]["mfu"] < 1


def test_only_process_zero_writes(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with RunLog(LogConfig(profile_steps="0:10"), tmp_path / "np_btl") as run_log:
        run_log.on_chunk(20, {"train_loss": 0.5})
        run_log.evaluation(20, {"0": {"all": {"mean": 0.5}}})
        window = run_log.profile_window()  # every process splits its scans at the window: the same programs
        assert (window.start, window.end) == (0, 10)
        window.begin()
        window.finish()  # ... but only process 0 traces
    assert not tmp_path.joinpath("np_btl").exists()


def test_a_log_that_cannot_be_written_is_one_warning_and_training_goes_on(tmp_path):
    blocked = tmp_path / "logs"
    blocked.write_text("a file where the log folder should be")
    run_log = RunLog(LogConfig(), blocked / "np_btl")
    with pytest.warns(UserWarning, match=r"logs/np_btl: cannot write the log \(.*\); logging to it stopped, training "
                                         r"goes on"):
        run_log.on_chunk(20, {"train_loss": 0.5})
    run_log.on_chunk(40, {"train_loss": 0.4})  # no second warning, no error
    run_log.close()


def wandb_history(folder: Path) -> list[dict]:
    """The history rows of W&B's offline run files (its records: LevelDB log blocks of protobufs)."""
    import json

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        data, block, fragments = path.read_bytes(), 32768, b""
        position = 7  # the file header: ":W&B", a magic number and a version
        while position + 7 <= len(data):
            if block - position % block < 7:  # a block's tail too short for a record header is padding
                position += block - position % block
                continue
            length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
            fragments += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a full record, or the last fragment of one
                record = wandb_internal_pb2.Record.FromString(fragments)
                fragments = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
            elif kind == 0:
                break
    return rows


def test_wandb_offline_gets_the_same_tags_and_resumes_its_run(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = tmp_path / "logs" / "np_btl"
    config = LogConfig(backend="wandb")
    with RunLog(config, folder, run_config={"model": "np_btl"}) as run_log:
        run_log.on_chunk(20, {"step": 20, "train_loss": 0.5, "val_nll": 0.4, "steps_per_second": 10.0})
        run_log.evaluation(20, {"0": {"z=0": {"mean": 0.75, "sem": 0.01}}})
    run_id = (folder / "wandb-run-id").read_text()
    with RunLog(config, folder) as run_log:  # a resumed run: the same W&B run
        run_log.on_chunk(40, {"train_loss": 0.3})
    assert (folder / "wandb-run-id").read_text() == run_id
    assert len(list(folder.glob(f"wandb/offline-run-*-{run_id}"))) == 2
    # W&B's service writes a finished run's file on its own time (measured: up to moments after finish()).
    deadline, rows = time.time() + 30, wandb_history(folder)
    while not any(row.get("train/loss") == 0.3 for row in rows) and time.time() < deadline:
        time.sleep(0.1)
        rows = wandb_history(folder)
    assert [(row["_step"], row.get("train/loss")) for row in rows if "train/loss" in row] == [(20, 0.5), (40, 0.3)]
    assert any(row.get("eval/unseen_accuracy/z=0/NC=0") == 0.75 for row in rows)
    assert any(row.get("perf/steps_per_second") == 10.0 for row in rows)


@pytest.mark.slow
def test_tensorboard_serves_a_run_and_headless_chromium_screenshots_it(pools, tmp_path):
    """docs/tensorboard_screenshot.py (which made docs/tensorboard.png) on a fresh run."""
    import importlib.util
    import shutil

    from PIL import Image

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian's chromium and chromium-driver")
    run = ExperimentRun("test", None, tmp_path, EvalConfig(context_sizes=(0,), num_tasks=20), progress=False)
    run.fit_and_evaluate_reward_model("np_btl", MODEL, pools, data_identity={}, train=TRAIN, episodes=SPEC,
                                      user_names=["z=0", "z=1"])
    path = Path(__file__).parents[1] / "docs" / "tensorboard_screenshot.py"
    spec = importlib.util.spec_from_file_location("tensorboard_screenshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shot = module.screenshot(tmp_path / "logs", tmp_path / "shot.png")
    with Image.open(shot) as image:
        assert image.size[0] >= 1600 and len(image.convert("L").getcolors(256)) > 50  # drawn, not blank
