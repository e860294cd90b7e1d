"""What every run writes: its locked output folder, results.json, tables and plots; and the run
context its models share (``ExperimentRun``: fit, evaluate, log, write).

The schema of results.json is documented in docs/results.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nps.config import config_to_dict  # noqa: E402
from nps.data.episodes import EpisodeSpec  # noqa: E402
from nps.errors import OutputDirError  # noqa: E402
from nps.files import atomic_save_figure, atomic_write_json, exclusive_lock  # noqa: E402
from nps.models.reward import RewardModelConfig, build_reward_model  # noqa: E402
from nps.train.distributed import WAIT_FOR_PEERS, agree_with_primary, barrier, is_primary  # noqa: E402
from nps.train.evaluate import EvalConfig, check_unseen_targets, evaluate_unseen_accuracy  # noqa: E402
from nps.train.logging import LogConfig, RunLog  # noqa: E402
from nps.train.loop import FitResult, TrainConfig, fit  # noqa: E402

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


@dataclasses.dataclass
class ExperimentRun:
    """What the models of one experiment run share (``nps reproduce``, or any run that writes a
    results.json): its output folder, how each model is evaluated, where its logs go, progress and
    echo, and the clock. ``experiment_run`` opens one on a locked folder; ``finish`` writes it out.

    Each model gets ``out/checkpoints/<name>`` (a re-run resumes it; a checkpoint of another run
    config is refused), ``out/logs/<name>`` (curves, evaluation, any profile trace) and a results
    entry: its unseen-target accuracy per N^C and user group, best step and validation NLL, steps
    trained, throughput, wall clock and history.
    """

    experiment: str
    config: Any  # the experiment's typed config, recorded whole in results.json
    out: Path
    evaluation: EvalConfig
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    progress: bool = True
    echo: Callable[..., None] = print
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def fit_and_evaluate(self, name: str, model, pools: dict[str, Any], *, kind: str, episodes: EpisodeSpec,
                         train: TrainConfig, run_config: dict[str, Any], user_names: Sequence[str],
                         eval_episodes: EpisodeSpec | None = None, mesh=None) -> tuple[FitResult, dict[str, Any]]:
        """Fit any ``fit``-able ``model`` on ``pools`` ("train", "val", "test") and evaluate it on
        the test pool for ``user_names``; returns the fit and the model's results entry. ``kind``:
        the model's kind, for the results; ``run_config`` identifies the run (model, data, base LM);
        ``eval_episodes``: the test tasks' shape when it differs from training's (e.g. N^T = 13 at
        test for DPO trained with N^T = 9)."""
        eval_episodes = eval_episodes or episodes
        check_unseen_targets(self.evaluation.context_sizes, eval_episodes)
        agree_with_primary(run_config, f"run config of {name}", WAIT_FOR_PEERS)  # each process its part of one model
        start = time.perf_counter()
        with RunLog(self.log, self.out / "logs" / name, run_config=run_config) as run_log:
            result = fit(model, pools["train"], pools["val"], episodes, train, self.out / "checkpoints" / name,
                         run_config=run_config, progress=self.progress, description=name, mesh=mesh,
                         hooks=run_log.hooks())
            accuracy = evaluate_unseen_accuracy(
                result.model(), pools["test"], eval_episodes, user_names, self.evaluation.context_sizes,
                self.evaluation.num_tasks, self.evaluation.seed)
            run_log.evaluation(result.steps, accuracy)
        return result, {
            "kind": kind,
            "unseen_accuracy": accuracy,
            "best_step": result.best_step,
            "best_val_nll": result.best_val_loss,
            "train_steps": result.steps,
            "train_steps_per_second": result.steps_per_second,
            "wall_clock_seconds": time.perf_counter() - start,
            "history": result.history,
        }

    def fit_and_evaluate_reward_model(self, name: str, config: RewardModelConfig, pools: dict[str, Any], *,
                                      data_identity: dict[str, Any], train: TrainConfig, episodes: EpisodeSpec,
                                      user_names: Sequence[str]) -> tuple[FitResult, dict[str, Any]]:
        """``fit_and_evaluate`` of the reward model ``config`` describes, built for the pools'
        options and seeded by ``train.seed``; its run config is the model's config and the data's
        identity."""
        model = build_reward_model(pools["train"].option_dim, config, seed=train.seed)
        run_config = {"model": config_to_dict(config), "data": data_identity}
        return self.fit_and_evaluate(name, model, pools, kind=config.kind, episodes=episodes, train=train,
                                     run_config=run_config, user_names=user_names)

    def finish(self, *, tables: list[str], plots: list[Path], **results) -> dict[str, Any]:
        """Write results.json (the experiment, its config, ``results``, the plots' names and the
        total wall clock), send the plots to the run's log as images (``logs/plots``), print the
        tables and where things were written; returns what results.json holds."""
        results = {"experiment": self.experiment, "config": config_to_dict(self.config)} | results | {
            "plots": [p.name for p in plots], "wall_clock_seconds": time.perf_counter() - self.started}
        path = write_results(self.out, results)
        with RunLog(self.log, self.out / "logs" / "plots") as run_log:  # process 0 alone writes
            run_log.images(0, plots)
        if is_primary():
            for table in tables:
                self.echo(table + "\n")
            self.echo(f"wrote {path}\nplots: {', '.join(str(p) for p in plots)}")
        return results


@contextlib.contextmanager
def experiment_run(experiment: str, config, out: str | Path, *, fresh: bool = False, progress: bool = True,
                   echo=print) -> Iterator[ExperimentRun]:
    """An ``ExperimentRun`` of ``config`` (its ``eval``, and its ``log`` where it has one) on the
    locked output folder ``out`` (``run_directory``), its clock started now."""
    started = time.perf_counter()
    with run_directory(out, fresh) as directory:
        yield ExperimentRun(experiment, config, directory, config.eval, getattr(config, "log", LogConfig()),
                            progress, echo, started)


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
