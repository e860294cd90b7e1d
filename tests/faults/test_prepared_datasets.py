"""Prepared datasets under faults: a killed `nps prepare`, a second writer, damaged or crafted files in
the folder, and what preparing leaves behind or reaches for."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from uf_fixture import write_random_jsonl

from nps.cli import main
from nps.data.prepared import BuildParameters, find_prepared, load_preferences, prepare_preferences
from nps.errors import ConfigError
from nps.files import LockedError, exclusive_lock, file_sha256

REPO = Path(__file__).resolve().parents[2]


def quiet(_):
    pass


def config_dir(out, source, build=BuildParameters()):
    return out / "ultrafeedback_preferences" / f"{build.config_name}-{file_sha256(source)[:12]}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small prepared dataset; tests that damage it work on a copy."""
    root = tmp_path_factory.mktemp("prepared")
    release = write_random_jsonl(root / "train.jsonl", num_prompts=60, seed=3)
    return prepare_preferences(release, root / "out", echo=quiet)


@pytest.fixture
def copy(prepared, tmp_path):
    import shutil

    target = tmp_path / "dataset"
    shutil.copytree(prepared, target)
    return target


def test_a_killed_prepare_is_never_taken_for_a_dataset_and_holds_off_a_second_writer(tmp_path, capsys):
    out = tmp_path / "out"
    small = write_random_jsonl(tmp_path / "small.jsonl", num_prompts=60, seed=3)
    complete = prepare_preferences(small, out, echo=quiet)
    big = write_random_jsonl(tmp_path / "big.jsonl", num_prompts=2000, seed=4)
    folder = config_dir(out, big)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-m", "nps.cli", "prepare", "hh", "--data", str(big), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not list(folder.glob("incomplete.*")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        # The child is writing: a second writer of this dataset is refused, naming it.
        with pytest.raises(LockedError, match=rf"{folder} is in use by another nps process \(pid {child.pid}\)"):
            with exclusive_lock(folder):
                pass
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    (unfinished,) = folder.glob("incomplete.*")  # the kill came mid-write

    assert load_preferences(out).directory == complete  # not "holds 2 prepared datasets"
    (unfinished / "dataset_info.json").write_text("{}")  # even one that got as far as its dataset_info.json
    assert load_preferences(out).directory == complete
    with pytest.raises(ConfigError, match="an unfinished dataset left by an interrupted `nps prepare`"):
        load_preferences(unfinished)

    capsys.readouterr()
    with exclusive_lock(folder):  # as if another `nps prepare` of this dataset were running
        assert main(["prepare", "hh", "--data", str(big), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"nps: error: the prepared dataset {folder} is in use by another nps process " \
                                      f"(pid {os.getpid()}); wait for it to finish, or use another folder\n"
    assert unfinished.exists()  # the refused process touched nothing
    assert main(["prepare", "hh", "--data", str(big), "--out", str(out)]) == 0
    assert f"removed {unfinished}, an unfinished dataset left by an interrupted `nps prepare`" in \
        capsys.readouterr().out
    assert not list(folder.glob("incomplete.*"))
    assert find_prepared(folder) == folder / "1.0.0"


def test_prepare_looks_nothing_up_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from tensorflow_datasets.core.utils import gcs_utils

    def no_network(*args, **kwargs):
        raise AssertionError("nps prepare reached for the network")

    for name in ("gcs_dataset_info_files", "is_dataset_on_gcs", "gcs_path"):
        monkeypatch.setattr(gcs_utils, name, no_network)
    monkeypatch.setattr("socket.socket.connect", no_network)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    release = write_random_jsonl(tmp_path / "train.jsonl", num_prompts=60, seed=3)
    directory = prepare_preferences(release, tmp_path / "out", echo=quiet)
    assert list(temporary.iterdir()) == []
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
                  if p.parent != directory) == [
        "ultrafeedback_preferences", f"ultrafeedback_preferences/{directory.parent.name}",
        f"ultrafeedback_preferences/{directory.parent.name}/.nps.lock",
        f"ultrafeedback_preferences/{directory.parent.name}/1.0.0"]


def test_a_crafted_features_json_imports_nothing(copy, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "crafted_features.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    features = json.loads((copy / "features.json").read_text())
    features["featuresDict"]["features"]["prompt"]["pythonClassName"] = "crafted_features.Text"
    (copy / "features.json").write_text(json.dumps(features))
    info = json.loads((copy / "dataset_info.json").read_text())
    info["features"] = {"pythonClassName": "crafted_features.Features"}
    info["moduleName"] = "crafted_features"
    (copy / "dataset_info.json").write_text(json.dumps(info))
    data = load_preferences(copy)
    assert not marker.exists() and "crafted_features" not in sys.modules
    assert len(data.splits["train"]) == data.metadata["split_sizes"]["train"]


def damage_array_record(directory):
    path = next(directory.glob("*-train.array_record*"))
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:300]) + data[300:])


def truncate_val(directory):
    path = next(directory.glob("*-val.array_record*"))
    path.write_bytes(path.read_bytes()[:500])


def metadata_edit(**changes):
    def edit(directory):
        path = directory / "metadata.json"
        metadata = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                del metadata[key]
            else:
                metadata[key] = value
        path.write_text(json.dumps(metadata))
    return edit


def rewrite(name, content):
    def edit(directory):
        (directory / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return edit


def dataset_info_edit(change):
    def edit(directory):
        path = directory / "dataset_info.json"
        info = json.loads(path.read_text())
        change(info)
        path.write_text(json.dumps(info))
    return edit


DAMAGE = {  # what is done to the dataset → (what the error names, what it says)
    "array_record bytes flipped": (damage_array_record, "train.array_record", "the train split cannot be read"),
    "array_record truncated": (truncate_val, "val.array_record", "the val split cannot be read"),
    "metadata.json not JSON": (rewrite("metadata.json", "{"), "metadata.json", "not valid JSON"),
    "metadata.json not UTF-8": (rewrite("metadata.json", b"\xff\xfe"), "metadata.json", "not valid JSON"),
    "metadata.json a list": (rewrite("metadata.json", "[]"), "metadata.json", "not a JSON object"),
    "metadata.json without content_hash": (metadata_edit(content_hash=None), "metadata.json",
                                           "'content_hash' is missing"),
    "metadata.json unknown recipe": (metadata_edit(build={"recipe": "x", "conflict_rate": 1.0, "split_by": "pair",
                                                          "seed": 42}), "metadata.json", "'build' is invalid"),
    "metadata.json other attributes": (metadata_edit(attributes=["honesty"]), "metadata.json",
                                       "'attributes' ['honesty'] are not"),
    "metadata.json split sizes": (metadata_edit(split_sizes={"train": 1, "val": 1, "test": 1}), "metadata.json",
                                  "the splits hold"),
    "dataset_info.json not JSON": (rewrite("dataset_info.json", "{"), "dataset_info.json",
                                   "not a valid description of this dataset"),
    "dataset_info.json other version": (dataset_info_edit(lambda i: i.update(version="9.9.9")), "dataset_info.json",
                                        "not a valid description of this dataset"),
    "dataset_info.json without splits": (dataset_info_edit(lambda i: i.pop("splits")), "dataset_info.json",
                                         "lists no train, val, test split"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_dataset_is_one_line_naming_the_file(copy, capfd, damage):
    edit, file, message = DAMAGE[damage]
    edit(copy)
    with pytest.raises(ConfigError) as error:
        load_preferences(copy)
    text = str(error.value)
    assert text.startswith(str(copy)) and file in text and message in text and "\n" not in text, text
    assert "delete" in text and "prepare" in text  # the fix
    assert capfd.readouterr().err == ""  # no library log lines either
