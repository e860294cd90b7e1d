"""UltraFeedback as preference pairs: read the public release, pair completions, label per attribute.

The release (``openbmb/UltraFeedback``, downloaded by the user) is JSON lines or parquet
with one record per prompt: ``instruction`` and ``completions[]``, each with ``response``
and ``annotations.{helpfulness, honesty, truthfulness, instruction_following}.Rating``.
Real records hold ratings such as "N/A", completions without a response and prompts
with fewer than two usable answers: those are skipped and counted (``ReadReport``),
never a crash half-way. A malformed line or record (not UTF-8, not JSON, not an object,
no or an empty instruction, completions or annotations of the wrong type, text that is not
valid Unicode) is skipped whole and counted by reason, so no pair ever comes from it;
``strict=True`` (``nps prepare --strict``) makes the first one an error instead.

Pairs are all pairs of a prompt's usable completions (the released code's recipe,
paper §5.3). Each attribute is a user type whose choice is the higher rating; ties
are kept here as 0.5 and dropped by the paper's recipes (``hh_pairs``, ``hht_pairs``); VPL's UF-P-2 and
UF-P-4 (``controversial_pairs``) keep them for the sampler's coin.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nps.data.pairs import SPLIT_FRACTIONS, OptionPairPool, PairPool, choices, conflicting, split_indices, untied
from nps.errors import ConfigError
from nps.files import atomic_write_bytes, atomic_write_text

ATTRIBUTES = ("helpfulness", "honesty", "truthfulness", "instruction_following")


MALFORMED = {  # reason → what it means, for the report
    "not_utf8": "not UTF-8",
    "not_json": "not JSON",
    "not_an_object": "not a JSON object",
    "no_instruction": "no 'instruction' string",
    "empty_instruction": "an empty 'instruction'",
    "bad_completions": "'completions' not a list of objects",
    "bad_annotations": "'annotations' not an object",
    "invalid_text": "text that is not valid Unicode (a lone surrogate)",
    "rating_out_of_range": "a rating outside 1–5",
}
RATINGS = (1.0, 5.0)  # the release's scale: a rating outside it is a damaged record, not a strong opinion


@dataclasses.dataclass
class ReadReport:
    """What reading kept and skipped, for the user to see (every count is of records or completions)."""

    prompts_read: int = 0  # records read, malformed ones included
    prompts_kept: int = 0
    prompts_with_fewer_than_two_answers: int = 0
    completions_kept: int = 0
    completions_missing_response: int = 0
    completions_unrated: int = 0  # a needed rating missing, "N/A" or not a number
    malformed: dict[str, int] = dataclasses.field(default_factory=dict)  # skipped records by reason (MALFORMED)
    first_malformed: str | None = None  # "file:record: reason" of the first, to find it

    def summary(self) -> str:
        text = (
            f"{self.prompts_kept} of {self.prompts_read} prompts kept ({self.prompts_with_fewer_than_two_answers} "
            f"with fewer than two usable answers); {self.completions_kept} completions kept, "
            f"{self.completions_missing_response} without a response, {self.completions_unrated} unrated"
        )
        if self.malformed:
            reasons = ", ".join(f"{n} {MALFORMED[reason]}" for reason, n in self.malformed.items())
            text += (f"; {sum(self.malformed.values())} malformed records skipped ({reasons}; the first: "
                     f"{self.first_malformed})")
        return text


class _Malformed(Exception):
    """A record to skip whole; ``args[0]`` is its reason (a key of ``MALFORMED``)."""


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
    """Pairs of completions of one prompt on the host, before they are a pool: ids into ``Completions``
    and each attribute's choice, which the recipes filter and split by. ``option_pair_pool`` makes them
    an ``OptionPairPool`` whose utilities are the ratings (its sampler's labels reproduce ``choice``).

    first, second: [N] completion ids; choice [N, A]: ``nps.data.pairs.choices`` of the ratings (1.0 if
    ``first`` has the higher rating for that attribute, 0.0 if ``second`` has, 0.5 for a tie).
    """

    first: np.ndarray
    second: np.ndarray
    choice: np.ndarray

    def __len__(self) -> int:
        return int(self.first.shape[0])

    def take(self, index: np.ndarray) -> Pairs:
        return Pairs(self.first[index], self.second[index], self.choice[index])


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(record number, record) from a .jsonl/.json-lines or .parquet file; a line that cannot be
    decoded comes as ``_Malformed`` in the record's place."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError as exc:  # pragma: no cover - pyarrow comes with tensorflow-datasets
            raise ConfigError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
        try:
            for batch_start, batch in _parquet_batches(parquet.ParquetFile(path)):
                for offset, record in enumerate(batch):
                    yield batch_start + offset + 1, record
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise ConfigError(f"{path}: not a readable parquet file ({exc}); download UltraFeedback's train "
                              "split again") from None
        return
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; pass UltraFeedback's train file (JSON lines or parquet)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror}); pass UltraFeedback's train file") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield number, _Malformed("not_utf8")
                continue
            if line.strip():
                try:
                    yield number, json.loads(line)
                except ValueError:
                    yield number, _Malformed("not_json")


def _parquet_batches(file) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    start = 0
    for batch in file.iter_batches(batch_size=1024):
        rows = batch.to_pylist()
        yield start, rows
        start += len(rows)


def _rating(annotations: dict[str, Any], attribute: str) -> float | None:
    annotation = annotations.get(attribute)
    if isinstance(annotation, list):  # some exports wrap each annotation in a one-element list
        annotation = annotation[0] if annotation else None
    rating = annotation.get("Rating") if isinstance(annotation, dict) else None
    if isinstance(rating, bool):  # JSON true is not the rating 1
        return None
    try:
        value = float(rating)
    except (TypeError, ValueError):
        return None  # "N/A", missing, or not a number
    return None if np.isnan(value) else value


def _text(value: str) -> str:
    """``value`` if it can be written as UTF-8 (JSON's "\\ud800" escape decodes to a lone surrogate that cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Malformed("invalid_text") from None
    return value


def _usable_completions(record: Any, attributes: tuple[str, ...], report: ReadReport) -> tuple[str, list]:
    """The record's instruction and its usable (response, ratings); ``_Malformed`` if it must be skipped whole.
    Completions without a response or a needed rating are counted in ``report`` and left out."""
    if isinstance(record, _Malformed):
        raise record
    if not isinstance(record, dict):
        raise _Malformed("not_an_object")
    instruction = record.get("instruction")
    if not isinstance(instruction, str):
        raise _Malformed("no_instruction")
    if not instruction.strip():
        raise _Malformed("empty_instruction")
    completions = record.get("completions") or []
    if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
        raise _Malformed("bad_completions")
    if not all(isinstance(c.get("annotations") or {}, dict) for c in completions):
        raise _Malformed("bad_annotations")
    usable, missing, unrated = [], 0, 0
    for completion in completions:
        response = completion.get("response")
        if not isinstance(response, str) or not response.strip():
            missing += 1
            continue
        scores = [_rating(completion.get("annotations") or {}, a) for a in attributes]
        if any(s is None for s in scores):
            unrated += 1
            continue
        if not all(RATINGS[0] <= s <= RATINGS[1] for s in scores):
            raise _Malformed("rating_out_of_range")
        usable.append((_text(response), scores))
    instruction = _text(instruction)
    report.completions_missing_response += missing  # counted only once the record is known to be well formed
    report.completions_unrated += unrated
    return instruction, usable


def read_ultrafeedback(path: str | Path, attributes: tuple[str, ...] = ATTRIBUTES, *,
                       strict: bool = False) -> tuple[Completions, ReadReport]:
    """Every usable completion of the release at ``path``, and counts of what was skipped.

    A completion is usable if it has a non-empty response and a numeric rating for every
    attribute in ``attributes``; a prompt is kept if it has at least two usable completions.
    A malformed record is skipped and counted by reason (``strict``: an error naming it).
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
        try:
            instruction, usable = _usable_completions(record, tuple(attributes), report)
        except _Malformed as malformed:
            reason = malformed.args[0]
            if strict:
                raise ConfigError(f"{path}:{number}: {MALFORMED[reason]}; fix or delete this record, or prepare "
                                  "without --strict to skip and count such records") from None
            report.malformed[reason] = report.malformed.get(reason, 0) + 1
            report.first_malformed = report.first_malformed or f"{path.name}:{number}: {MALFORMED[reason]}"
            continue
        if len(usable) < 2:
            report.prompts_with_fewer_than_two_answers += 1
            continue
        for response, scores in usable:
            prompt_index.append(len(prompts))
            responses.append(response)
            ratings.append(scores)
        prompts.append(instruction)
        report.prompts_kept += 1
        report.completions_kept += len(usable)
    if not prompts:
        raise ConfigError(f"{path}: no prompt with two usable answers ({report.summary()}); is this UltraFeedback's "
                          "train split, as JSON lines or parquet?")
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
    return pairs.take(np.flatnonzero(untied(pairs.choice)))


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


def controversial_pairs(completions: Completions, seed: int = 42) -> Pairs:
    """VPL's UF-P-2 and UF-P-4 (over the completions' attributes, its users): the pairs on which one
    attribute strictly prefers each side. An attribute's tie is kept: a task's sampler breaks it by a fair
    coin, as VPL breaks its ties."""
    pairs = all_pairs(completions)
    kept = pairs.take(np.flatnonzero(np.any(pairs.choice == 1.0, axis=1) & np.any(pairs.choice == 0.0, axis=1)))
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


# The release on the Hugging Face hub: six JSON-lines files, one per prompt source.
RELEASE_REPO = "openbmb/UltraFeedback"
RELEASE_FILES = ("evol_instruct.jsonl", "false_qa.jsonl", "flan.jsonl", "sharegpt.jsonl", "truthful_qa.jsonl",
                 "ultrachat.jsonl")


def download_release_subset(out: str | Path, num_prompts: int, source: str = "evol_instruct.jsonl",
                            repo: str = RELEASE_REPO) -> Path:
    """The first ``num_prompts`` records of one of the release's files, fetched from the Hugging Face hub
    (the whole file, once, into the hub's cache) and written to ``out/ultrafeedback-<source>-<n>.jsonl``.
    ``source``: one of ``RELEASE_FILES``. Needs the network; an unreachable hub or an unknown file is one
    ``ConfigError`` line."""
    if num_prompts < 1:
        raise ConfigError(f"num_prompts={num_prompts}: must be a positive integer")
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo, source, repo_type="dataset"))
    except Exception as exc:  # no network, HF_HUB_OFFLINE, auth or an unknown file: one line with the fix
        raise ConfigError(f"{repo}/{source}: could not download from the Hugging Face hub ({type(exc).__name__}); "
                          "download UltraFeedback elsewhere and pass the file") from exc
    lines = []
    with path.open("rb") as release:
        for line in release:
            if line.strip():
                lines.append(line if line.endswith(b"\n") else line + b"\n")
                if len(lines) == num_prompts:
                    break
    target = Path(out) / f"ultrafeedback-{Path(source).stem}-{len(lines)}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(target, b"".join(lines))


# A stand-in for the release where it cannot be downloaded (the notebooks' offline fallback; the tests' files).
SAMPLE_WORDS = ["the", "answer", "is", "helpful", "honest", "maybe", "clearly", "because", "fox", "dog", "step",
                "first"]


def release_completion(index: int, ratings: tuple | None) -> dict[str, Any]:
    """One completion in the release's schema, rated (helpfulness, honesty, truthfulness) with
    instruction_following 3; ``None``: a completion with an empty response and no annotations."""
    if ratings is None:
        return {"model": "m", "response": "", "annotations": {}}
    names = ("helpfulness", "honesty", "truthfulness")
    annotations = {name: {"Rating": str(value), "Rationale": "..."} for name, value in zip(names, ratings)}
    annotations["instruction_following"] = {"Rating": "3", "Rationale": "..."}
    return {"model": f"model-{index}", "response": f"answer {index}", "annotations": annotations,
            "fine-grained_score": 3.0, "overall_score": 6.0}


def random_release_records(num_prompts: int, seed: int = 0, answers: int = 4) -> list[dict[str, Any]]:
    """Records in the release's schema with random 1–5 ratings and short random texts."""
    import random

    rng = random.Random(seed)
    out = []
    for p in range(num_prompts):
        completions = []
        for a in range(answers):
            item = release_completion(a, (rng.randint(1, 5), rng.randint(1, 5), rng.randint(1, 5)))
            item["response"] = " ".join(rng.choice(SAMPLE_WORDS) for _ in range(rng.randint(3, 12)))
            completions.append(item)
        prompt = f"question {p}: " + " ".join(rng.choice(SAMPLE_WORDS) for _ in range(4))
        out.append({"source": "random", "instruction": prompt, "models": [], "completions": completions})
    return out


def write_random_release(path: str | Path, num_prompts: int, seed: int = 0) -> Path:
    """``random_release_records`` as a JSON-lines file that ``read_ultrafeedback`` and ``nps prepare`` take."""
    return atomic_write_text(path, "\n".join(json.dumps(r) for r in random_release_records(num_prompts, seed)) + "\n")
