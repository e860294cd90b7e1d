"""The machine a notebook or script runs on (CPU, GPU or TPU), and settings picked for it.

``detect()`` asks JAX once; ``Accelerator.pick(cpu=..., gpu=..., tpu=...)`` chooses a setting by
kind, so one notebook runs small on a laptop or in CI and at the paper's scale on a Colab GPU or
TPU. ``Accelerator.dtype`` is the dtype for frozen base weights on that hardware.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, TypeVar

KINDS = ("cpu", "gpu", "tpu")
T = TypeVar("T")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """What one JAX device of a kind can do: peak dense bf16 matmul FLOP/s, memory (what XLA may
    use, bytes), memory bandwidth and chip-to-chip bandwidth (bytes/s each way; None: unknown)."""

    peak_flops: float
    memory: float | None
    memory_bandwidth: float | None
    interconnect_bandwidth: float | None


# By jax's device_kind, matched by prefix, longest first. Peak FLOP/s (the usual MFU denominator,
# as MaxText and levanter use): NVIDIA's H100/H200 datasheets (SXM 989 TFLOP/s dense BF16, half the
# 1,979 with sparsity; H100 PCIe 756, NVL 835), A100 (312), L4 (121); Google Cloud's TPU
# system-architecture pages (v2 45, v3 123, v4 275, v5e 197, v5p 459, v6e 918 per chip), with
# their HBM bandwidth (v5e 819 GB/s, v5p 2,765, v6e 1,640) and ICI bandwidth per chip (v5e 1,600
# Gb/s, v5p 4,800, v6e 3,584). Memory: for TPUs what libtpu's compiler says it may use (its
# out-of-memory message: v5e 15.75 GiB, v5p 95.74, v6e 31.25); for the H100, the 80 GB SXM's
# device memory (../shared/targets/h100.txtpb, 84,929,347,584 bytes), 3.35 TB/s and NVLink's
# 450 GB/s each way; the H200's 141 GB and 4.8 TB/s from its datasheet.
CHIPS = {
    "NVIDIA H100 PCIe": Chip(756e12, None, None, None),
    "NVIDIA H100 NVL": Chip(835e12, None, None, None),
    "NVIDIA H100": Chip(989e12, 84_929_347_584, 3.35e12, 450e9),
    "NVIDIA H200": Chip(989e12, 141e9, 4.8e12, 450e9),
    "NVIDIA GH200": Chip(989e12, None, None, None),
    "NVIDIA A100": Chip(312e12, None, None, None),
    "NVIDIA L4": Chip(121e12, None, None, None),
    "TPU v2": Chip(45e12, None, None, None),
    "TPU v3": Chip(123e12, None, None, None),
    "TPU v4": Chip(275e12, None, None, None),
    "TPU v5 lite": Chip(197e12, 15.75 * GIB, 819e9, 200e9),
    "TPU v5e": Chip(197e12, 15.75 * GIB, 819e9, 200e9),
    "TPU v5p": Chip(459e12, 95.74 * GIB, 2765e9, 600e9),
    "TPU v5": Chip(459e12, 95.74 * GIB, 2765e9, 600e9),
    "TPU v6 lite": Chip(918e12, 31.25 * GIB, 1640e9, 448e9),
    "TPU v6e": Chip(918e12, 31.25 * GIB, 1640e9, 448e9),
}


def chip(device_kind: str) -> Chip | None:
    """The ``Chip`` of a device kind (``jax.Device.device_kind``), or None for one not listed (a CPU)."""
    kind = next((k for k in sorted(CHIPS, key=len, reverse=True) if device_kind.startswith(k)), None)
    return None if kind is None else CHIPS[kind]


def peak_flops_per_second(devices: Sequence) -> float | None:
    """The devices' summed peak FLOP/s, or None when any device's kind is not in ``CHIPS``."""
    total = 0.0
    for device in devices:
        spec = chip(device.device_kind)
        if spec is None:
            return None
        total += spec.peak_flops
    return total


@dataclasses.dataclass(frozen=True)
class Accelerator:
    kind: str  # "cpu", "gpu" or "tpu": where JAX runs by default
    device_count: int
    device_kind: str  # JAX's name for the device: "cpu", "Tesla T4", "NVIDIA A100-SXM4-40GB", "TPU v5 lite", ...
    bfloat16: bool  # native bfloat16 matmuls: TPUs, and GPUs of compute capability 8.0 (Ampere) or newer

    @property
    def dtype(self) -> str:
        """Frozen base weights in bfloat16 where the hardware computes in it, float32 elsewhere (a CPU, or a
        T4, which has no bfloat16 units)."""
        return "bfloat16" if self.bfloat16 else "float32"

    def pick(self, *, cpu: T, gpu: T, tpu: T | None = None) -> T:
        """This runtime's setting: ``cpu``, ``gpu``, or ``tpu`` (a TPU takes ``gpu``'s when none is given)."""
        if self.kind == "cpu":
            return cpu
        return tpu if self.kind == "tpu" and tpu is not None else gpu

    def __str__(self) -> str:
        return f"{self.kind.upper()} runtime: {self.device_count} × {self.device_kind}; base weights in {self.dtype}"


def _has_bfloat16(device) -> bool:
    if device.platform == "tpu":
        return True
    if device.platform != "gpu":
        return False
    try:  # CUDA devices report e.g. "8.0"; a device that does not is treated as without bfloat16
        return float(getattr(device, "compute_capability", "0")) >= 8.0
    except (TypeError, ValueError):
        return False


def detect() -> Accelerator:
    """The default JAX backend's devices, as an ``Accelerator`` (ROCm and other GPU platforms count as "gpu")."""
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    kind = platform if platform in KINDS else "gpu"
    return Accelerator(kind, len(devices), devices[0].device_kind, _has_bfloat16(devices[0]))
