"""The machine a notebook or script runs on (CPU, GPU or TPU), and settings picked for it.

``detect()`` asks JAX once; ``Accelerator.pick(cpu=..., gpu=..., tpu=...)`` chooses a setting by
kind, so one notebook runs small on a laptop or in CI and at the paper's scale on a Colab GPU or
TPU. ``Accelerator.dtype`` is the dtype for frozen base weights on that hardware.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

KINDS = ("cpu", "gpu", "tpu")
T = TypeVar("T")


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
