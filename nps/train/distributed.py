"""One JAX program across processes and hosts: joining a run, reading global arrays, process 0 writing.

nps runs on JAX's own multi-controller runtime, the engine TPU pods and GPU clusters use, with
the code path of one host: every process runs the same command, ``join_run`` connects them
(``jax.distributed.initialize``: the cluster's own detection on TPU pods, SLURM, Open MPI and
Kubernetes, or an explicit coordinator, process count and id), the mesh spans every process's
devices, each process computes its part of every global batch inside jit, and process 0 alone
prints, writes results and plots, and holds the output folder's lock. On CPUs the processes talk
through gloo collectives, which is how multi-process runs are tested on one machine.

A process that dies is noticed by the others: a watchdog thread in every process beats a counter in
the coordination service's key-value store and, when another process's counter stops (or the
service itself), ends this process with one line, well before JAX's own heartbeat timeout would
abort it with a page of logs.

Processes that were started differently never train together: right after joining, every process
compares what shapes its numbers (the experiment, its full config, the files the config names, the
nps source) with process 0's through the same key-value store, and before each model trains its
run config (the data's content hash, the base's weights hash); any difference stops every process
with one line naming the differing fields (``agree_with_primary``), before any step, never a hang.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax
import numpy as np

from nps.config import differing_fields
from nps.errors import ConfigError, NPSError
from nps.files import Digest, file_sha256

T = TypeVar("T")

# Environment variables matching `--coordinator`, `--num-processes`, `--process-id`.
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "NPS_COORDINATOR", "NPS_NUM_PROCESSES", "NPS_PROCESS_ID"
# Where JAX's own cluster detection applies (it reads these platforms' variables itself).
CLUSTER_MARKERS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


class PeerLostError(NPSError):
    """Another process of the run stopped or never joined: exit code 3, however it was noticed (the
    watchdog, a broken collective, a collective checkpoint save)."""

    exit_code = 3


@dataclasses.dataclass(frozen=True)
class JoinSettings:
    """How to join a multi-process run. Empty: read ``NPS_*`` variables, then the cluster's own."""

    coordinator: str | None = None  # HOST:PORT of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    join_timeout: int = 120  # seconds to wait for every process to join
    peer_timeout: float = 20.0  # seconds after which a silent peer counts as gone (the watchdog)

    def resolved(self) -> JoinSettings:
        """These settings with unset fields taken from the ``NPS_*`` environment variables."""
        def env_int(name):
            value = os.environ.get(name)
            if value is None:
                return None
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r} must be an integer", name) from None

        return dataclasses.replace(
            self,
            coordinator=self.coordinator or os.environ.get(ENV_COORDINATOR),
            num_processes=self.num_processes if self.num_processes is not None else env_int(ENV_NUM_PROCESSES),
            process_id=self.process_id if self.process_id is not None else env_int(ENV_PROCESS_ID),
        )

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    def check(self) -> None:
        missing = [flag for flag, value in (("--coordinator", self.coordinator), ("--num-processes",
                   self.num_processes), ("--process-id", self.process_id)) if value is None]
        if missing:
            raise ConfigError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                              f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing {', '.join(missing)}")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"--process-id {self.process_id} must be in 0..{self.num_processes - 1} "
                              f"(--num-processes {self.num_processes})")
        if ":" not in self.coordinator:
            raise ConfigError(f"--coordinator {self.coordinator!r} must be HOST:PORT (process 0's address)")


def in_cluster_environment() -> bool:
    """A launcher JAX detects by itself started several processes (TPU pod slice, SLURM, Open MPI)."""
    sizes = [os.environ.get(name, "") for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")]
    if any(size.isdigit() and int(size) > 1 for size in sizes):
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def join_run(settings: JoinSettings = JoinSettings()) -> bool:
    """Join a multi-process run when this process was launched as one; returns whether it did.

    One process with no flags, no ``NPS_*`` variables and no cluster around is a plain
    single-process run: nothing is initialised.
    """
    settings = settings.resolved()
    if not settings.explicit and not in_cluster_environment():
        return False
    if not settings.peer_timeout > 0:
        raise ConfigError(f"--peer-timeout {settings.peer_timeout} must be a positive number of seconds")
    if jax._src.distributed.global_state.client is not None:  # noqa: SLF001 -- already joined (a notebook
        return True  # calling twice); asking jax.process_count() here would start the backend too early
    # CPU devices of different processes talk through gloo (the setting only concerns the CPU backend;
    # it must be made before the backend starts, so it cannot depend on which backend that is).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": settings.join_timeout,
                              "heartbeat_timeout_seconds": max(60, int(3 * settings.peer_timeout))}
    if settings.explicit:
        settings.check()
        kwargs |= {"coordinator_address": settings.coordinator, "num_processes": settings.num_processes,
                   "process_id": settings.process_id}
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as error:  # noqa: BLE001 -- jaxlib raises several types for a run that never formed
        raise PeerLostError(
            f"could not join the run at {settings.coordinator or 'the cluster coordinator'} within "
            f"{settings.join_timeout} s ({type(error).__name__}); start every process with the same "
            "--coordinator and --num-processes, and each with its own --process-id"
        ) from None
    _start_watchdog(settings.peer_timeout)
    return True


def lost_peers(detail: str) -> str:
    """The one line a process prints when the run lost another of its processes."""
    return (f"process {jax.process_index()} of {jax.process_count()} lost its peers ({detail}); stopping. Every "
            "checkpoint already saved is kept: start all processes again with the same command to resume")


def is_peer_failure(error: BaseException) -> bool:
    """A collective or the coordination service failed because another process of the run is gone."""
    if jax._src.distributed.global_state.client is None:  # noqa: SLF001 -- not a multi-process run
        return False
    text = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) and any(
        sign in text for sign in ("Gloo", "Connection reset", "Connection closed", "UNAVAILABLE", "heartbeat"))


def leave_run() -> None:
    """Leave a multi-process run cleanly: all processes pass JAX's shutdown barrier together, so no
    process takes the coordinator's end for a crash. A no-op in a single-process run."""
    client = jax._src.distributed.global_state.client  # noqa: SLF001
    if client is not None:
        _watchdog_stopped.set()
        try:  # the others' watchdogs take a process that has left for one still alive
            client.key_value_set(f"{HEARTBEATS}{jax.process_index()}", "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001 -- the service is gone; shutdown below says so
            pass
        jax.distributed.shutdown()


_watchdog_stopped = threading.Event()


HEARTBEATS = "nps/heartbeat/"  # coordination-service keys: each process's beat count, or "done" once it left


def _start_watchdog(peer_timeout: float) -> None:
    """Every process beats a counter in the coordination service's key-value store and watches the
    others' counters: a peer whose counter has not moved for ``peer_timeout`` seconds (or a service
    that stopped answering for as long) ends this process with one line and exit code 3.

    The service's own liveness (``get_live_nodes``) would notice a dead peer only after JAX's
    heartbeat timeout (60 s), and a process waiting at a barrier sees no broken collective."""
    client = jax._src.distributed.global_state.client  # noqa: SLF001
    me, expected = jax.process_index(), jax.process_count()
    say = _error_writer()

    def watch():
        beat, seen, changed = 0, {}, {peer: time.monotonic() for peer in range(expected) if peer != me}
        unreachable_since = None
        while not _watchdog_stopped.wait(min(2.0, peer_timeout / 4)):
            now = time.monotonic()
            try:
                beat += 1
                client.key_value_set(f"{HEARTBEATS}{me}", str(beat), allow_overwrite=True)
                values = dict(client.key_value_dir_get(HEARTBEATS))
                unreachable_since = None
            except Exception:  # noqa: BLE001 -- the coordination service itself is gone (process 0 died)
                unreachable_since = unreachable_since or now
                if now - unreachable_since > peer_timeout:
                    _lost(say, f"the coordination service stopped answering {now - unreachable_since:.0f} s ago")
                continue
            for peer in changed:
                value = values.get(f"{HEARTBEATS}{peer}")
                if value == "done":  # it left the run cleanly and waits at the shutdown barrier
                    changed[peer] = now
                elif value != seen.get(peer):
                    seen[peer], changed[peer] = value, now
            silent = sorted(peer for peer, at in changed.items() if now - at > peer_timeout)
            if silent:
                _lost(say, f"process {', '.join(map(str, silent))} silent for over {peer_timeout:.0f} s; "
                      f"{expected - len(silent)} of {expected} still running")

    threading.Thread(target=watch, name="nps-peer-watchdog", daemon=True).start()


def _error_writer() -> Callable[[str], Any]:
    """Writes to this process's stderr as it is now, even while a checkpoint save holds file
    descriptor 2 in a temporary file (``nps.train.checkpoint``), whose contents an exit would lose:
    a copy of the descriptor where stderr is one, else ``sys.stderr`` (a notebook kernel's stream)."""
    try:
        if sys.stderr.fileno() == 2:
            copy = os.dup(2)
            return lambda text: os.write(copy, text.encode())
    except (AttributeError, OSError, ValueError):  # no file descriptor behind sys.stderr
        pass
    return lambda text: (sys.stderr.write(text), sys.stderr.flush())


def _lost(say: Callable[[str], Any], detail: str) -> None:
    say(f"nps: error: {lost_peers(detail)}\n")
    os._exit(PeerLostError.exit_code)


INPUT_FIELDS = ("data", "model", "embedder", "steering_run")  # config fields that name what a run reads
DIFFERENCES_SHOWN = 4  # differing fields a refusal names (then "and N more")


def code_version() -> dict[str, str]:
    """This nps: its version and a digest of its package's files (two checkouts of one version may differ)."""
    package = Path(__file__).resolve().parents[1]
    digest = Digest()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.raw(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return {"version": importlib.metadata.version("nps"), "files": digest.hexdigest()}


def run_identity(command: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """What every process of one run must share at the start: the command (experiment, --out, --fresh),
    the full config (JSON form), each file the config names (size and SHA-256; a folder's contents are
    identified by what a model's run config records of them, agreed before it trains) and the code."""
    files = {field: {"bytes": os.path.getsize(config[field]), "sha256": file_sha256(config[field])}
             for field in INPUT_FIELDS if isinstance(config.get(field), str) and os.path.isfile(config[field])}
    return {"command": command, "config": config, "files": files, "nps": code_version()}


_agreements = itertools.count()  # every process compares in the same order, so a counter names each comparison


def agree_with_primary(facts: dict[str, Any], what: str, timeout: float) -> None:
    """Stop every process of the run, each with the same one line, if any process's ``facts`` (JSON
    values) differ from process 0's; a no-op in a single-process run. Process 0 publishes its facts,
    every other process its verdict on them, then process 0 the run's verdict, which all read: no
    process goes on while another refuses, and a process that never answers is a ``PeerLostError``
    after ``timeout`` seconds. ``what`` names the comparison in the message."""
    client = jax._src.distributed.global_state.client  # noqa: SLF001
    if client is None or jax.process_count() == 1:
        return
    me, count, key = jax.process_index(), jax.process_count(), f"nps/agree/{next(_agreements)}-{what}"
    wait = int(timeout * 1000)
    try:
        if me == 0:
            client.key_value_set(f"{key}/facts", json.dumps(facts, sort_keys=True))
            complaints = []
            for peer in range(1, count):
                fields = json.loads(client.blocking_key_value_get(f"{key}/fields/{peer}", wait))
                if fields:
                    shown = ", ".join(fields[:DIFFERENCES_SHOWN]) + (
                        f" and {len(fields) - DIFFERENCES_SHOWN} more" if len(fields) > DIFFERENCES_SHOWN else "")
                    complaints.append(f"process {peer} differs from process 0 in {shown}")
            verdict = "; ".join(complaints)
            client.key_value_set(f"{key}/verdict", verdict)
        else:
            primary = json.loads(client.blocking_key_value_get(f"{key}/facts", wait))
            client.key_value_set(f"{key}/fields/{me}", json.dumps(differing_fields(primary, json.loads(
                json.dumps(facts, sort_keys=True)))))
            verdict = client.blocking_key_value_get(f"{key}/verdict", wait)
        client.wait_at_barrier(f"{key}/read", wait)  # process 0 hosts the store: it leaves only once all have read
    except Exception as error:  # noqa: BLE001 -- jaxlib's errors for a peer or service that is gone
        raise PeerLostError(lost_peers(f"no answer within {timeout:.0f} s while comparing the {what} "
                                       f"({type(error).__name__})")) from None
    if verdict:
        # Every process has read the verdict and refuses: they leave the run together (JAX's shutdown barrier),
        # or process 0's exit ends the coordination service under the others, which JAX then aborts (SIGABRT)
        # before they say their line.
        try:
            leave_run()
        except Exception:  # noqa: BLE001 -- a peer already gone; the refusal below is this process's line
            pass
        raise ConfigError(f"the processes of this run were started differently ({what}): {verdict}; start every "
                          "process with the same command, data and nps")


def is_primary() -> bool:
    """Process 0: the one that prints, writes results and plots, and holds output locks."""
    return jax.process_index() == 0


def host_value(tree: Any) -> Any:
    """``jax.device_get`` for arrays of a multi-process run too: a replicated array is read from this
    process's own copy, a sharded one gathered from every process (all processes must call it)."""
    if all(not isinstance(leaf, jax.Array) or leaf.is_fully_addressable for leaf in jax.tree.leaves(tree)):
        return jax.device_get(tree)  # one transfer for the whole tree

    def fetch(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return jax.device_get(leaf)
        if leaf.sharding.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    return jax.tree.map(fetch, tree)


_barriers = itertools.count()
WAIT_FOR_PEERS = 6 * 3600  # seconds a process waits for the others at a barrier: one may work alone for long


def barrier(name: str, timeout: float = WAIT_FOR_PEERS) -> None:
    """Every process waits here for the others (a no-op in a single-process run).

    A barrier of the coordination service, not a device collective: one process may work alone
    for long before it (pretraining a base, embedding a dataset) where a collective would time
    out. Every process passes the same barriers in the same order, so a counter names them.
    """
    client = jax._src.distributed.global_state.client  # noqa: SLF001
    if client is None or jax.process_count() == 1:
        return
    client.wait_at_barrier(f"nps-{next(_barriers)}-{name}", int(timeout * 1000))


def primary_first(make: Callable[[], T], name: str) -> T:
    """``make()`` on process 0 first (it writes: a dataset, a cache, a pretrained base), then on the
    others, which find the result on disk and read it; no two processes ever write one file."""
    if is_primary():
        made = make()
        barrier(f"nps-primary-first-{name}")
        return made
    barrier(f"nps-primary-first-{name}")
    return make()


def put_global(tree: Any, shardings: Any) -> Any:
    """``tree`` with every array on its sharding (``shardings``: a tree whose leaves are shardings and
    whose structure is a prefix of ``tree``'s; one sharding for the whole tree), each process building it from its own copy (every process holds the same
    values: the pools, the initial state, a base built from one seed). Unlike ``jax.device_put``
    across processes, nothing is compared between processes, so no process can wait in a check the
    others skipped. Arrays already committed to their sharding are kept; an abstract leaf
    (``jax.ShapeDtypeStruct``, for ``nps plan``) gets its sharding attached."""

    def put(leaf, sharding):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        if isinstance(leaf, jax.Array) and leaf.committed and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf
        if jax.process_count() == 1:
            return jax.device_put(leaf, sharding)
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            key_data = put(jax.random.key_data(leaf), sharding)
            return jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def put_all(sharding, subtree):
        return jax.tree.map(lambda leaf: put(leaf, sharding), subtree)

    return jax.tree.map(put_all, shardings, tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def alongside(tree: Any, placed: Any) -> Any:
    """``tree`` replicated on the devices that ``placed`` (e.g. a model's parameters) spans, so the two
    can meet in one jitted call; unchanged when ``placed`` lives on one device."""
    reference = next((leaf for leaf in jax.tree.leaves(placed) if isinstance(leaf, jax.Array)), None)
    sharding = getattr(reference, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or len(sharding.device_set) == 1:
        return tree
    return put_global(tree, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
