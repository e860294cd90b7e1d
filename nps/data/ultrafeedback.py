"""UltraFeedback as preference pairs: read the public release, pair completions, label per attribute.

The release (``openbmb/UltraFeedback``, downloaded by the user) is JSON lines or parquet
with one record per prompt: ``instruction`` and ``completions[]``, each with ``response``
and ``annotations.{helpfulness, honesty, truthfulness, instruction_following}.Rating``.
Real records hold ratings such as "N/A", completions without a response and prompts
with fewer than two usable answers: those are skipped and counted (``ReadReport``),
never a crash half-way.

Pairs are all pairs of a prompt's usable completions (the released code's recipe,
paper §5.3). Each attribute is a user type whose choice is the higher rating; ties
are kept here as 0.5 and dropped by the dataset recipes (``hh_pairs``, ``hht_pairs``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nps.data.pairs import SPLIT_FRACTIONS, OptionPairPool, PairPool, choices, conflicting, split_indices
from nps.errors import ConfigError

ATTRIBUTES = ("helpfulness", "honesty", "truthfulness", "instruction_following")


@dataclasses.dataclass
class ReadReport:
    """What reading kept and skipped, for the user to see (every count is of records or completions)."""

    prompts_read: int = 0
    prompts_kept: int = 0
    prompts_with_fewer_than_two_answers: int = 0
    completions_kept: int = 0
    completions_missing_response: int = 0
    completions_unrated: int = 0  # a needed rating missing, "N/A" or not a number

    def summary(self) -> str:
        return (
            f"{self.prompts_kept} of {self.prompts_read} prompts kept ({self.prompts_with_fewer_than_two_answers} "
            f"with fewer than two usable answers); {self.completions_kept} completions kept, "
            f"{self.completions_missing_response} without a response, {self.completions_unrated} unrated"
        )


@dataclasses.dataclass(frozen=True)
class Completions:
    """Usable completions: prompts [P] (str), prompt_index [M], responses [M] (str), ratings [M, A] float."""

    prompts: list[str]
    prompt_index: np.ndarray
    responses: list[str]
    ratings: np.ndarray
    attributes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Pairs of completions of one prompt: ids into ``Completions`` and each attribute's choice.

    first, second: [N] completion ids; choice [N, A]: 1.0 if ``first`` has the higher rating
    for that attribute, 0.0 if ``second`` has, 0.5 for a tie.
    """

    first: np.ndarray
    second: np.ndarray
    choice: np.ndarray

    def __len__(self) -> int:
        return int(self.first.shape[0])

    def take(self, index: np.ndarray) -> Pairs:
        return Pairs(self.first[index], self.second[index], self.choice[index])


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(record number, record) from a .jsonl/.json-lines or .parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError as exc:  # pragma: no cover - pyarrow comes with tensorflow-datasets
            raise ConfigError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
        for batch_start, batch in _parquet_batches(parquet.ParquetFile(path)):
            for offset, record in enumerate(batch):
                yield batch_start + offset + 1, record
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError as exc:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg}); expected one record per line") from None


def _parquet_batches(file) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    start = 0
    for batch in file.iter_batches(batch_size=1024):
        rows = batch.to_pylist()
        yield start, rows
        start += len(rows)


def _rating(completion: dict[str, Any], attribute: str) -> float | None:
    annotation = (completion.get("annotations") or {}).get(attribute)
    if isinstance(annotation, list):  # some exports wrap each annotation in a one-element list
        annotation = annotation[0] if annotation else None
    rating = annotation.get("Rating") if isinstance(annotation, dict) else None
    try:
        value = float(rating)
    except (TypeError, ValueError):
        return None  # "N/A", missing, or not a number
    return value if np.isfinite(value) else None


def read_ultrafeedback(path: str | Path, attributes: tuple[str, ...] = ATTRIBUTES) -> tuple[Completions, ReadReport]:
    """Every usable completion of the release at ``path``, and counts of what was skipped.

    A completion is usable if it has a non-empty response and a numeric rating for every
    attribute in ``attributes``; a prompt is kept if it has at least two usable completions.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file; download UltraFeedback's train split (JSON lines or parquet)")
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ConfigError(f"attributes {unknown} are not UltraFeedback's; choose from {list(ATTRIBUTES)}")
    report = ReadReport()
    prompts, prompt_index, responses, ratings = [], [], [], []
    for number, record in _records(path):
        report.prompts_read += 1
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise ConfigError(f"{path}: record {number} has no 'instruction' string; is this UltraFeedback?")
        usable = []
        for completion in record.get("completions") or []:
            response = completion.get("response") if isinstance(completion, dict) else None
            if not isinstance(response, str) or not response.strip():
                report.completions_missing_response += 1
                continue
            scores = [_rating(completion, a) for a in attributes]
            if any(s is None for s in scores):
                report.completions_unrated += 1
                continue
            usable.append((response, scores))
        if len(usable) < 2:
            report.prompts_with_fewer_than_two_answers += 1
            continue
        for response, scores in usable:
            prompt_index.append(len(prompts))
            responses.append(response)
            ratings.append(scores)
        prompts.append(record["instruction"])
        report.prompts_kept += 1
        report.completions_kept += len(usable)
    completions = Completions(
        prompts=prompts,
        prompt_index=np.asarray(prompt_index, np.int64),
        responses=responses,
        ratings=np.asarray(ratings, np.float64).reshape(-1, len(attributes)),
        attributes=tuple(attributes),
    )
    return completions, report


def all_pairs(completions: Completions) -> Pairs:
    """Every unordered pair of completions of the same prompt, (earlier, later) in file order."""
    firsts, seconds = [], []
    boundaries = np.flatnonzero(np.diff(completions.prompt_index)) + 1
    for group in np.split(np.arange(len(completions.responses)), boundaries):
        i, j = np.triu_indices(len(group), k=1)
        firsts.append(group[i])
        seconds.append(group[j])
    first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    second = np.concatenate(seconds) if seconds else np.zeros(0, np.int64)
    return Pairs(first, second, choices(completions.ratings[first], completions.ratings[second]))


def without_ties(pairs: Pairs) -> Pairs:
    """Pairs on which no attribute is tied (the paper drops ties on any score)."""
    return pairs.take(np.flatnonzero(~np.any(pairs.choice == 0.5, axis=1)))


def with_conflict_rate(pairs: Pairs, rate: float, seed: int) -> Pairs:
    """The released recipe (paper §5.3): n = #conflicting pairs; keep int(n·rate) conflicting and
    int(n·(1 − rate)) non-conflicting pairs, drawn without replacement, in a shuffled order."""
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"conflict_rate={rate} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    conflict = conflicting(pairs.choice)
    hard, easy = np.flatnonzero(conflict), np.flatnonzero(~conflict)
    n = len(hard)
    want_easy = int(n * (1.0 - rate))
    if want_easy > len(easy):
        raise ConfigError(
            f"conflict_rate={rate} needs {want_easy} non-conflicting pairs but only {len(easy)} exist; raise the rate"
        )
    keep = np.concatenate([rng.choice(hard, int(n * rate), replace=False), rng.choice(easy, want_easy, replace=False)])
    return pairs.take(rng.permutation(keep))


def split_pairs(
    pairs: Pairs, completions: Completions, seed: int, by: str = "pair", fractions=SPLIT_FRACTIONS
) -> dict[str, Pairs]:
    """Train / val / test. ``by="pair"`` (the paper: a prompt may appear in several splits) or
    ``by="prompt"`` (every prompt's pairs in one split). Sizes are exact floors of the fractions
    (the remainder goes to test), over pairs or over prompts."""
    if by not in ("pair", "prompt"):
        raise ConfigError(f"split by={by!r} is unknown; use 'pair' or 'prompt'")
    units = np.arange(len(pairs)) if by == "pair" else np.unique(completions.prompt_index[pairs.first])
    parts = split_indices(np.random.default_rng(seed).permutation(units), fractions)
    if by == "pair":
        return {name: pairs.take(np.sort(index)) for name, index in parts.items()}
    prompt_of_pair = completions.prompt_index[pairs.first]
    return {name: pairs.take(np.flatnonzero(np.isin(prompt_of_pair, index))) for name, index in parts.items()}


def hh_pairs(completions: Completions, conflict_rate: float = 1.0, seed: int = 42) -> Pairs:
    """Helpfulness vs honesty (paper §5.3): no ties on either, then the chosen conflict rate."""
    columns = [completions.attributes.index(a) for a in ("helpfulness", "honesty")]
    pairs = all_pairs(completions)
    two = Pairs(pairs.first, pairs.second, pairs.choice[:, columns])
    return with_conflict_rate(without_ties(two), conflict_rate, seed)


def hht_pairs(completions: Completions, seed: int = 42) -> Pairs:
    """Helpfulness, honesty, truthfulness (paper §5.4): no ties on any; one choice differs from the others."""
    columns = [completions.attributes.index(a) for a in ("helpfulness", "honesty", "truthfulness")]
    pairs = all_pairs(completions)
    three = without_ties(Pairs(pairs.first, pairs.second, pairs.choice[:, columns]))
    kept = three.take(np.flatnonzero(conflicting(three.choice)))
    return kept.take(np.random.default_rng(seed).permutation(len(kept)))


def option_pair_pool(pairs: Pairs, ratings: np.ndarray, options: Any):
    """An ``OptionPairPool`` over a table of options (features [M, D], or token arrays for a policy):
    ``pairs``' first/second are row ids into the table, and each attribute's rating [M, A] is that
    user type's utility (the sampler's choices reproduce ``pairs.choice``)."""
    import jax.numpy as jnp

    rows = _table_rows(options)
    if ratings.shape[0] != rows:
        raise ConfigError(f"the option table has {rows} rows but there are {ratings.shape[0]} rated options; "
                          "build features for every option, in order")
    ratings = np.asarray(ratings, np.float32)
    return OptionPairPool(
        PairPool(
            option_a=jnp.asarray(pairs.first[:, None], jnp.int32),
            option_b=jnp.asarray(pairs.second[:, None], jnp.int32),
            utility_a=jnp.asarray(ratings[pairs.first]),
            utility_b=jnp.asarray(ratings[pairs.second]),
        ),
        options,
    )


def _table_rows(tree: Any) -> int:
    import jax

    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ConfigError(f"the option table's arrays have different numbers of rows: {sorted(sizes)}")
    return sizes.pop()


def conflict_test_pools(test_pairs, ratings: np.ndarray, features, context_rate: float, seed: int):
    """(targets, contexts): conflicting targets, and contexts at ``context_rate`` from disjoint pairs."""
    conflict = np.flatnonzero(conflicting(test_pairs.choice))
    agree = np.flatnonzero(~conflicting(test_pairs.choice))
    order = np.random.default_rng(seed).permutation(conflict)
    targets, held = order[: len(order) // 2], order[len(order) // 2 :]
    context_pairs = with_conflict_rate(test_pairs.take(np.concatenate([held, agree])), context_rate, seed)
    return (option_pair_pool(test_pairs.take(np.sort(targets)), ratings, features),
            option_pair_pool(context_pairs, ratings, features))
