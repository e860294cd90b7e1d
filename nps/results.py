"""What every run writes: its locked output folder, results.json, tables and plots.

The schema of results.json is documented in docs/results.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nps.errors import OutputDirError  # noqa: E402
from nps.files import atomic_save_figure, atomic_write_json, exclusive_lock  # noqa: E402
from nps.train.distributed import barrier, is_primary  # noqa: E402
from nps.train.logging import LogConfig, RunLog  # noqa: E402

RESULTS_SCHEMA_VERSION = 1


@contextlib.contextmanager
def run_directory(out: str | Path, fresh: bool = False) -> Iterator[Path]:
    """The output folder of a run, created, checked writable and held by an exclusive lock.

    A second process on the same folder gets one line naming this one's pid, never a shared
    folder; ``fresh`` discards earlier checkpoints and logs (after the lock is held). In a multi-process
    run the processes share the folder: process 0 holds the lock and discards, the others wait.
    """
    out = Path(out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A name of its own: the processes of a multi-process run probe one folder at the same moment.
        descriptor, probe = tempfile.mkstemp(prefix=".nps-write-test-", dir=out)
        try:
            os.write(descriptor, b"ok")
        finally:
            os.close(descriptor)
            os.unlink(probe)
    except OSError as error:
        raise OutputDirError(
            f"output folder {out} is not writable ({error.strerror}); pass --out with a folder you can write to"
        ) from None
    with exclusive_lock(out, f"output folder {out}") if is_primary() else contextlib.nullcontext():
        if fresh and is_primary():
            for name in ("checkpoints", "checkpoints.corrupt", "logs"):
                shutil.rmtree(out / name, ignore_errors=True)
        barrier(f"nps-run-directory-{out}")
        yield out


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """Write ``out/results.json`` atomically (a temp file renamed into place); process 0 alone writes."""
    results = {"schema_version": RESULTS_SCHEMA_VERSION, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | results
    path = out / "results.json"
    return atomic_write_json(path, results) if is_primary() else path


def save_figure(fig, path: Path) -> Path:
    """Save and close a figure, atomically; process 0 alone writes."""
    if is_primary():
        fig.tight_layout()
        atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def finish_run(out: Path, start: float, echo, *, tables: list[str], plots: list[Path], log: LogConfig | None = None,
               **results) -> dict[str, Any]:
    """Write results.json (with plot names and total wall-clock), print the tables and the paths;
    with ``log``, the plots also go to the run's log as images (``logs/plots``)."""
    results = results | {"plots": [p.name for p in plots], "wall_clock_seconds": time.perf_counter() - start}
    path = write_results(out, results)
    if log is not None:
        with RunLog(log, out / "logs" / "plots") as run_log:  # process 0 alone writes
            run_log.images(0, plots)
    if is_primary():
        for table in tables:
            echo(table + "\n")
        echo(f"wrote {path}\nplots: {', '.join(str(p) for p in plots)}")
    return results


def format_accuracy_table(models: dict[str, dict[str, Any]], user_names: list[str]) -> str:
    """Rows: model × N^C; columns: unseen accuracy [%] per user type and overall (± s.e.)."""
    columns = [*user_names, "all"]
    header = f"{'model':<22}{'N^C':>5}" + "".join(f"{c:>18}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, model in models.items():
        for size, by_user in model["unseen_accuracy"].items():
            cells = "".join(
                f"{100 * by_user[c]['mean']:>11.1f} ± {100 * by_user[c]['sem']:<4.1f}" for c in columns
            )
            lines.append(f"{name:<22}{size:>5}{cells}")
    return "\n".join(lines)


def plot_accuracy_vs_context(
    models: dict[str, dict[str, Any]], user_names: list[str], path: Path, title: str
) -> Path:
    """Unseen accuracy vs N^C, one panel per user type, error bars = ± 1 s.e."""
    fig, axes = plt.subplots(1, len(user_names), figsize=(4.2 * len(user_names), 3.4), sharey=True, squeeze=False)
    for ax, user in zip(axes[0], user_names):
        for name, model in models.items():
            sizes = [int(s) for s in model["unseen_accuracy"]]
            means = [100 * v[user]["mean"] for v in model["unseen_accuracy"].values()]
            sems = [100 * v[user]["sem"] for v in model["unseen_accuracy"].values()]
            ax.errorbar(sizes, means, yerr=sems, marker="o", capsize=3, label=name)
        ax.set_title(f"users {user}")
        ax.set_xlabel("context pairs $N^C$")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on unseen pairs [%]")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)
