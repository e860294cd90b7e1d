"""`nps launch --local N -- <nps command>`: N processes of one JAX program on this machine.

Each process is the same `nps` command with `NPS_COORDINATOR`, `NPS_NUM_PROCESSES` and
`NPS_PROCESS_ID` set (what `--coordinator`, `--num-processes`, `--process-id` say), so it joins
the run through `nps.train.distributed.join_run` like any process of a cluster. For trying
multi-process runs on one machine, `cpu_devices` simulates that many CPU devices per process;
`gpus_per_process` gives each process its own GPUs. The launcher forwards Ctrl-C, and when one
process fails it stops the others and returns the first failure's status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from nps.errors import ConfigError
from nps.train.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_devices_environment(env: dict[str, str], count: int) -> dict[str, str]:
    """``env`` for a process on ``count`` simulated CPU devices. Its other XLA flags are kept: two
    processes compared bit for bit must compile alike (an optimisation level changes last bits)."""
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return dict(env, XLA_FLAGS=" ".join([*flags, f"{DEVICE_COUNT_FLAG}={count}"]), JAX_PLATFORMS="cpu")


def process_environment(index: int, count: int, port: int, cpu_devices: int | None,
                        gpus_per_process: int | None) -> dict[str, str]:
    """The environment of process ``index`` of ``count``."""
    env = dict(os.environ, **{ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(count),
                              ENV_PROCESS_ID: str(index)})
    if cpu_devices:
        env = cpu_devices_environment(env, cpu_devices)
    if gpus_per_process:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * gpus_per_process + g) for g in range(gpus_per_process))
    return env


def launch_local(count: int, program: list[str], *, cpu_devices: int | None = None,
                 gpus_per_process: int | None = None, port: int = 0) -> int:
    """Run ``nps <program>`` as ``count`` processes of one run (``program`` may start with the "--" that
    ends ``nps launch``'s own flags); returns the run's exit status."""
    program = program[1:] if program[:1] == ["--"] else program
    if count < 1:
        raise ConfigError(f"--local {count} must be at least 1")
    if not program:
        raise ConfigError("nothing to launch: write the nps command after --, e.g. nps launch --local 2 -- "
                          "reproduce synthetic")
    if program[0] in ("nps", "launch"):
        program = program[1:] if program[0] == "nps" else program
        if program[:1] == ["launch"]:
            raise ConfigError("nps launch cannot launch itself; write the command to run, e.g. reproduce synthetic")
    port = port or free_port()
    processes = [
        subprocess.Popen([sys.executable, "-m", "nps.cli", *program],
                         env=process_environment(index, count, port, cpu_devices, gpus_per_process))
        for index in range(count)
    ]
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for process in processes:
            process.send_signal(signal.SIGINT)
        return max(p.wait() for p in processes) and 130
    if failed:
        deadline = time.monotonic() + 30
        for process in processes:  # the others notice the lost peer themselves; give them the time to say so
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if process.poll() is None:
                process.kill()
        return failed[0]
    return 0
