"""Colab and installs: every notebook starts with the same setup cell, which installs nps (with the JAX
build the runtime needs) only where it is missing; the README opens every notebook in Colab from the
repository pyproject.toml names; constraints.txt pins a version inside every range pyproject.toml states;
runtime detection picks settings per CPU / GPU / TPU."""

import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from packaging.requirements import Requirement

from nps.accelerator import Accelerator, _has_bfloat16, detect

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REPOSITORY = PROJECT["urls"]["Repository"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def setup_cell(path: Path) -> str:
    return next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def test_every_notebook_starts_with_the_same_setup_cell_naming_the_repository():
    assert {p.name for p in NOTEBOOKS} >= {"synthetic.ipynb", "steering.ipynb", "hh_dpo.ipynb"}
    cells = {p.name: setup_cell(p) for p in NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the notebooks' first code cells differ"
    assert f'NPS_REPOSITORY = "{REPOSITORY}"' in cells["synthetic.ipynb"]


def test_the_readme_opens_every_notebook_in_colab_from_the_repository():
    readme = (ROOT / "README.md").read_text()
    owner_repo = REPOSITORY.removeprefix("https://github.com/")
    badges = re.findall(r"\(https://colab\.research\.google\.com/github/([^)]+)\)", readme)
    assert sorted(badges) == sorted(f"{owner_repo}/blob/main/notebooks/{p.name}" for p in NOTEBOOKS)
    assert readme.count("https://colab.research.google.com/assets/colab-badge.svg") == len(NOTEBOOKS)


@pytest.mark.parametrize("found, device, nvidia_smi, extra", [
    ({"libtpu"}, False, False, "[tpu]"),
    (set(), True, False, "[tpu]"),  # a TPU VM's /dev/accel0, before any jax is installed
    ({"jax_cuda12_plugin"}, False, True, "[cuda12]"),
    (set(), False, True, "[cuda12]"),
    ({"jax_cuda13_plugin"}, False, True, "[cuda13]"),
    (set(), False, False, ""),
])
def test_the_setup_cell_installs_nps_with_the_runtime_s_jax_build_only_where_missing(
        monkeypatch, found, device, nvidia_smi, extra):
    source = setup_cell(NOTEBOOKS[0])
    find_spec, exists = importlib.util.find_spec, os.path.exists

    def fake_find_spec(name):  # nps not installed (Colab), and only the ``found`` JAX plugins preinstalled
        if name in ("nps", "libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin"):
            return SimpleNamespace() if name in found else None
        return find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(os.path, "exists", lambda path: device if path == "/dev/accel0" else exists(path))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if nvidia_smi and name == "nvidia-smi" else None)
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: commands.append(command))
    namespace = {}
    exec(compile(source, "setup", "exec"), namespace)
    assert len(commands) == 1 and commands[0][1:5] == ["-m", "pip", "install", "--quiet"]
    assert commands[0][5] == f"nps{extra} @ git+{REPOSITORY}"
    assert namespace["accelerator"].kind == "cpu"  # then detects the runtime as usual

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)  # nps installed (a checkout, CI): nothing to do
    commands.clear()
    exec(compile(source, "setup", "exec"), {})
    assert commands == []


def test_every_range_in_pyproject_admits_its_pin_in_constraints():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    extras = PROJECT["optional-dependencies"]
    for text in PROJECT["dependencies"] + extras["test"] + extras["parity"] + extras["tpu"]:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "nps":
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt: run .ci/lock"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, outside {text}"
        assert any(s.operator in (">=", "==") for s in requirement.specifier), f"{text}: no lower bound"


def test_settings_are_picked_for_the_runtime():
    here = detect()
    assert here.kind == "cpu" and here.dtype == "float32" and here.device_count >= 1
    assert here.pick(cpu="small", gpu="large") == "small"
    gpu, tpu = Accelerator("gpu", 1, "NVIDIA A100-SXM4-40GB", True), Accelerator("tpu", 8, "TPU v2", True)
    assert gpu.pick(cpu=1, gpu=2, tpu=3) == 2 and tpu.pick(cpu=1, gpu=2, tpu=3) == 3 and tpu.pick(cpu=1, gpu=2) == 2
    assert gpu.dtype == tpu.dtype == "bfloat16" and "8 × TPU v2" in str(tpu)
    assert _has_bfloat16(SimpleNamespace(platform="gpu", compute_capability="8.0"))
    assert not _has_bfloat16(SimpleNamespace(platform="gpu", compute_capability="7.5"))  # a T4
    assert not _has_bfloat16(SimpleNamespace(platform="gpu"))
    assert _has_bfloat16(SimpleNamespace(platform="tpu")) and not _has_bfloat16(SimpleNamespace(platform="cpu"))
