"""The devices a plan compiles for: a TPU slice or pod, a GPU cluster, or this process's own.

TPU topologies come from libtpu, which compiles for any slice with no TPU present
(``jax.experimental.topologies``, ``pip install 'nps[tpu]'``); GPU clusters from the CUDA
plugin and an XLA target description of the GPU (``targets/*.txtpb``), with no GPU present
(``pip install 'nps[cuda12]'``; the plugin must start with ``CUDA_VISIBLE_DEVICES=-1`` and
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``). ``nps plan`` sets ``compile_only_environment`` itself. ``local``
is ``jax.devices()``: a real TPU or GPU, where a plan also runs its programs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from importlib import resources
from typing import Any

from nps.accelerator import Chip, chip
from nps.errors import ConfigError

# GPU kinds nps has a target description of: name -> (file in nps/plan/targets, devices per host).
GPU_TARGETS = {"h100": ("h100.txtpb", 8)}
TPU_KINDS = ("v5e", "v5p", "v6e")
EXAMPLES = "v5e:2x2 … v5e:16x16, v5p:2x2x2, v6e:4x4, h100:8 (one host), h100:2x8 (two hosts), or local"


@dataclasses.dataclass(frozen=True)
class Target:
    """A set of devices to compile for."""

    name: str
    devices: tuple[Any, ...]
    device_kind: str
    chip: Chip | None  # what one device can do (None: a kind nps has no figures for, e.g. a CPU)
    slices: int
    hosts: int
    runnable: bool  # the devices are this process's own: programs can run, not only compile

    @property
    def size(self) -> int:
        return len(self.devices)


def compile_only_environment(name: str) -> dict[str, str]:
    """The environment of a process that compiles for ``name``'s devices without having them (set
    before JAX starts its backends; empty for ``local``). GPUs: the CUDA plugin must start with no
    GPU visible. TPUs: the process runs on its CPU, and libtpu, which only describes the topology,
    is told it is on no TPU VM (else it looks for one's metadata and prints a page of warnings)."""
    kind = name.partition(":")[0].lower()
    if kind in GPU_TARGETS:
        return {"CUDA_VISIBLE_DEVICES": "-1", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
    if kind in TPU_KINDS:
        return {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}
    return {}


def resolve(name: str, slices: int = 1) -> Target:
    """The devices of ``name`` (see ``EXAMPLES``), ``slices`` TPU slices of it joined over the
    data-centre network."""
    import jax

    if slices < 1:
        raise ConfigError(f"--num-slices={slices} must be at least 1")
    if name == "local":
        if slices > 1:
            raise ConfigError("--num-slices applies to TPU topologies; local devices are what they are")
        devices = tuple(jax.devices())
        hosts = len({d.process_index for d in devices})
        found_slices = len({getattr(d, "slice_index", 0) for d in devices})
        return Target(name, devices, devices[0].device_kind, chip(devices[0].device_kind), found_slices, hosts, True)
    kind, _, shape = name.partition(":")
    kind = kind.lower()
    if kind in GPU_TARGETS:
        return _gpu(name, kind, shape, slices)
    if kind not in TPU_KINDS or not re.fullmatch(r"\d+x\d+(x\d+)?", shape):
        raise ConfigError(f"--topology={name!r} is not one nps can compile for; use {EXAMPLES}")
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology={name}: compiling for TPUs needs libtpu (no TPU needed): pip install 'nps[tpu]'")
    # libtpu otherwise takes a machine-wide lock on first use, and a second process that compiles
    # (another plan, a test worker) stops with "libtpu multi-process lockfile"; compiling touches no TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{kind}:{shape}", **({"num_slices": slices} if slices > 1 else {}))
    except Exception as error:  # noqa: BLE001 - libtpu's own word, in one line
        raise ConfigError(f"--topology={name}: libtpu cannot describe it: {_first_line(error)}") from None
    devices = tuple(description.devices)
    hosts = len({(getattr(d, "slice_index", 0), d.process_index) for d in devices})
    return Target(name, devices, devices[0].device_kind, chip(devices[0].device_kind), slices, hosts, False)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _gpu(name: str, kind: str, shape: str, slices: int) -> Target:
    from jax.experimental import topologies

    if slices > 1:
        raise ConfigError("--num-slices applies to TPU topologies; a GPU cluster is hosts × GPUs: e.g. h100:2x8")
    match = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
    if not match:
        raise ConfigError(f"--topology={name!r}: a GPU cluster is KIND:GPUS or KIND:HOSTSxGPUS, e.g. h100:8 or h100:2x8")
    hosts, per_host = int(match.group(1) or 1), int(match.group(2))
    needed = compile_only_environment(name)
    if any(os.environ.get(key) != value for key, value in needed.items()):
        raise ConfigError(f"--topology={name}: the CUDA plugin must start without GPUs; run with "
                          + " ".join(f"{k}={v}" for k, v in needed.items()))
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        raise ConfigError(f"--topology={name}: compiling for GPUs needs JAX's CUDA plugin (no GPU needed): "
                          "pip install 'nps[cuda12]'")
    text = resources.files("nps.plan").joinpath("targets", GPU_TARGETS[kind][0]).read_text()
    try:
        description = topologies.get_topology_desc(platform="cuda", target_config=text,
                                                   topology=f"1x{hosts}x{per_host}")
    except Exception as error:  # noqa: BLE001 - the plugin's own word, in one line
        raise ConfigError(f"--topology={name}: the CUDA plugin cannot describe it: {_first_line(error)}") from None
    devices = tuple(description.devices)
    return Target(name, devices, devices[0].device_kind, chip(devices[0].device_kind), 1, hosts, False)
