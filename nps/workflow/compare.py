"""`nps compare RUN_A RUN_B`: every metric of two runs side by side, and the regressions.

A metric is any ``{"mean", "sem"}`` entry of a model in results.json (accuracy per N^C and user
type, win rates, z-inference errors, the conflict study's and the continuum's tables, ...),
named by its path, e.g. ``np_btl/unseen_accuracy/10/honesty``. For each metric in both runs the
difference B − A has the standard error √(sem_A² + sem_B²). A difference is a regression when
the metric got worse (lower for accuracies and win rates; higher for errors and NLLs) by more
than ``tolerance`` *and* by more than ``sigmas`` standard errors: the first ignores changes too
small to matter, the second changes that sampling noise explains. A metric (or a whole model)
of A that B lacks, and a metric whose mean in B is NaN or infinite, fail the comparison too,
unless ``allow_missing``: a run that crashed half-way or diverged must not pass a regression
gate. Runs trained on different data (content hash, or the data record for generated data) are
refused unless allowed. A results.json of the wrong shape, of an unknown schema version, or with a
number that cannot mean what its field says (an accuracy or error rate outside [0, 1], a standard
error that is negative, infinite or NaN for more than one task, a count of tasks that is not a
positive integer) is one error line naming the field: such a file would let a regression through.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator

from nps.errors import ConfigError
from nps.files import atomic_write_text, read_text
from nps.results import RESULTS_SCHEMA_VERSION

LOWER_IS_BETTER = ("error", "nll", "loss")
PROPORTIONS = ("accuracy", "error", "rate", "share")  # metrics that are means of per-task proportions: in [0, 1]
NON_NEGATIVE = ("nll", "loss")


@dataclasses.dataclass(frozen=True)
class MetricDiff:
    name: str
    a: dict[str, float]
    b: dict[str, float]
    difference: float  # b − a
    sem: float  # of the difference
    lower_is_better: bool
    regression: bool

    @property
    def sigmas(self) -> float:
        return self.difference / self.sem if self.sem > 0 else math.copysign(math.inf, self.difference or 1.0)


@dataclasses.dataclass(frozen=True)
class Comparison:
    run_a: Path
    run_b: Path
    experiment: str
    diffs: list[MetricDiff]
    only_in_a: list[str]  # metrics of A that B lacks
    only_in_b: list[str]
    not_finite_in_b: list[str]  # metrics whose mean in B is NaN or infinite
    tolerance: float
    sigmas: float
    data_note: str
    allow_missing: bool = False

    @property
    def regressions(self) -> list[MetricDiff]:
        return [d for d in self.diffs if d.regression]

    @property
    def failed(self) -> bool:
        """B regressed, or (unless allowed) lacks a metric of A or has a non-finite one."""
        return bool(self.regressions) or not self.allow_missing and bool(self.only_in_a or self.not_finite_in_b)


def read_results(run: str | Path) -> tuple[Path, dict[str, Any]]:
    """results.json of a run folder (or the file itself), checked to be an nps results file."""
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"{path}: no results.json; pass a run folder written by `nps reproduce`")
    try:
        results = json.loads(read_text(path, "an nps results.json"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); the run may not have finished") from None
    if not isinstance(results, dict) or "models" not in results or "experiment" not in results:
        raise ConfigError(f"{path}: no 'experiment' and 'models' fields; is this an nps results.json?")
    version = results.get("schema_version")
    if version != RESULTS_SCHEMA_VERSION or isinstance(version, bool):
        raise ConfigError(f"{path}: schema_version {version!r} is not one this nps reads ({RESULTS_SCHEMA_VERSION}); "
                          "compare results.json files written by this version of nps")
    if not isinstance(results["models"], dict) or not all(isinstance(m, dict) for m in results["models"].values()):
        raise ConfigError(f"{path}: 'models' must map each model's name to its results; is this an nps results.json?")
    if not isinstance(results.get("data") or {}, dict):
        raise ConfigError(f"{path}: 'data' must be an object (the data's identity); is this an nps results.json?")
    return path, results


def metrics(results: dict[str, Any], path: Path | str = "results.json") -> dict[str, dict[str, float]]:
    """{path: {"mean", "sem", "num_tasks"?}} for every mean/sem entry under each model (not its history);
    a number that cannot mean what its field says is an error naming it (``check_metric``)."""
    found: dict[str, dict[str, float]] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict):
            if "mean" in node and "sem" in node:
                check_metric(node, name, path)
                found[name] = node
                return
            for key, value in node.items():
                if key != "history":
                    walk(value, f"{name}/{key}")

    for model, entry in results["models"].items():
        walk(entry, model)
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metric(entry: dict[str, Any], name: str, path: Path | str) -> None:
    """A metric's numbers against their meaning: the mean a number (NaN and infinity are judged by the
    comparison: a run that diverged), within [0, 1] for proportions and ≥ 0 for NLLs and losses;
    the standard error finite and ≥ 0 (NaN only for one task, which has none); ``num_tasks`` a positive
    integer. Anything else is a ``ConfigError`` naming the metric."""
    def refuse(what: str) -> None:
        raise ConfigError(f"{path}: {name}: {what}; is this an nps results.json, unedited?")

    mean, sem, tasks = entry["mean"], entry["sem"], entry.get("num_tasks", 2)
    for field, value in (("mean", mean), ("sem", sem)):
        if not _is_number(value):
            refuse(f"{field!r} is {value!r}, not a number")
    if not (_is_number(tasks) and tasks == int(tasks) and tasks >= 1):
        refuse(f"'num_tasks' is {tasks!r}, not a positive whole number")
    lowered = name.lower()
    if math.isfinite(mean) and any(word in lowered for word in PROPORTIONS) and not 0 <= mean <= 1:
        refuse(f"'mean' is {mean!r}, but a rate or accuracy lies in [0, 1]")
    if math.isfinite(mean) and any(word in lowered for word in NON_NEGATIVE) and mean < 0:
        refuse(f"'mean' is {mean!r}, but an NLL or loss is ≥ 0")
    if math.isnan(sem) and tasks > 1 or math.isinf(sem) or sem < 0:
        refuse(f"'sem' is {sem!r}, but a standard error is finite and ≥ 0 (NaN only for a single task)")


def _data_identity(results: dict[str, Any]) -> Any:
    data = results.get("data") or {}
    return data.get("content_hash") or {k: v for k, v in data.items() if k != "split_sizes"} or None


def _lower_is_better(name: str) -> bool:
    return any(word in name.lower() for word in LOWER_IS_BETTER)


def compare_runs(run_a: str | Path, run_b: str | Path, *, tolerance: float = 0.02, sigmas: float = 2.0,
                 allow_different_data: bool = False, allow_missing: bool = False) -> Comparison:
    for name, value in (("tolerance", tolerance), ("sigmas", sigmas)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"--{name} {value} must be a number ≥ 0")
    path_a, a = read_results(run_a)
    path_b, b = read_results(run_b)
    if a["experiment"] != b["experiment"]:
        raise ConfigError(f"{path_a} is a {a['experiment']!r} run and {path_b} a {b['experiment']!r} run; "
                          "compare runs of the same experiment")
    data_a, data_b = _data_identity(a), _data_identity(b)
    note = "same data" if data_a == data_b else f"different data: {data_a} vs {data_b}"
    if data_a != data_b and not allow_different_data:
        raise ConfigError(f"{path_a} and {path_b} were trained on different data ({data_a} vs {data_b}); "
                          "pass --allow-different-data to compare them anyway")
    metrics_a, metrics_b = metrics(a, path_a), metrics(b, path_b)
    unusable = sorted(n for n, m in metrics_a.items() if not math.isfinite(m["mean"]))
    if unusable:
        raise ConfigError(f"{path_a}: {unusable[0]}: 'mean' is {metrics_a[unusable[0]]['mean']!r}; A is the reference "
                          "and needs finite metrics: compare against another run")
    diffs = []
    for name in (n for n in metrics_a if n in metrics_b):
        ma, mb = metrics_a[name], metrics_b[name]
        difference = mb["mean"] - ma["mean"]
        sem = math.sqrt(sum(s**2 for s in (ma["sem"], mb["sem"]) if s == s))  # NaN sem (one task) counts 0
        lower = _lower_is_better(name)
        worse = difference if lower else -difference
        # A non-finite mean has no meaningful difference: it is judged apart (``not_finite_in_b``).
        diffs.append(MetricDiff(name, ma, mb, difference, sem, lower,
                                regression=math.isfinite(difference) and worse > tolerance and worse > sigmas * sem))
    not_finite = sorted(n for n, m in metrics_b.items() if not math.isfinite(m["mean"]))
    return Comparison(path_a, path_b, a["experiment"], diffs, sorted(set(metrics_a) - set(metrics_b)),
                      sorted(set(metrics_b) - set(metrics_a)), not_finite, tolerance, sigmas, note, allow_missing)


def _rows(comparison: Comparison) -> Iterator[list[str]]:
    for d in comparison.diffs:
        yield [d.name, f"{d.a['mean']:.4f} ± {d.a['sem']:.4f}", f"{d.b['mean']:.4f} ± {d.b['sem']:.4f}",
               f"{d.difference:+.4f} ± {d.sem:.4f}", f"{d.sigmas:+.1f}",
               "REGRESSION" if d.regression else "" if math.isfinite(d.b["mean"]) else "NOT FINITE"]


HEADER = ["metric", "A", "B", "B − A", "σ", ""]


def format_text(comparison: Comparison) -> str:
    rows = [HEADER, *_rows(comparison)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join([*lines, "", _summary(comparison)])


def format_markdown(comparison: Comparison) -> str:
    lines = [f"# nps compare: {comparison.experiment}", "", f"- A: `{comparison.run_a}`", f"- B: `{comparison.run_b}`",
             f"- {comparison.data_note}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(comparison)]
    return "\n".join([*lines, "", _summary(comparison), ""])


def _summary(comparison: Comparison) -> str:
    parts = [f"{len(comparison.diffs)} metrics compared ({comparison.data_note}); "
             f"{len(comparison.regressions)} regressions (worse by > {comparison.tolerance:g} and "
             f"> {comparison.sigmas:g} standard errors)"]
    verdict = "allowed by --allow-missing" if comparison.allow_missing else "FAILS the comparison"
    for label, names, fails in (("only in A", comparison.only_in_a, True), ("only in B", comparison.only_in_b, False),
                                ("not finite in B", comparison.not_finite_in_b, True)):
        if names:
            parts.append(f"{label} ({len(names)}{', ' + verdict if fails else ''}): {', '.join(names)}")
    return "\n".join(parts)


def compare_command(run_a: str, run_b: str, *, tolerance: float = 0.02, sigmas: float = 2.0,
                    markdown: str | None = None, allow_different_data: bool = False, allow_missing: bool = False,
                    echo=print) -> int:
    """`nps compare`: the comparison as text (and as Markdown in ``markdown``); 1 if B regressed or lacks
    what A has, else 0."""
    comparison = compare_runs(run_a, run_b, tolerance=tolerance, sigmas=sigmas,
                              allow_different_data=allow_different_data, allow_missing=allow_missing)
    echo(format_text(comparison))
    if markdown:
        try:
            atomic_write_text(markdown, format_markdown(comparison))
        except OSError as error:
            raise ConfigError(f"{markdown}: cannot be written ({error.strerror}); pass another --markdown "
                              "path") from None
    return 1 if comparison.failed else 0
