"""Prepared preference datasets: UltraFeedback pairs written once as a versioned tfds dataset.

``prepare_preferences`` reads the release, builds the recipe's pairs (HH or HHT, a conflict
rate, a seeded 80/10/10 split) and writes them with a tensorflow-datasets builder in the
array_record format, which needs no TensorFlow (docs/design.md). Each example is one pair:
the prompt, both responses, their per-attribute ratings and their ids in the source file.
The dataset's metadata holds the build parameters (recipe, conflict rate, split, seed, the
source file's hash, what reading skipped) and a content hash over every split's records;
every checkpoint and results.json trained on the data records that hash.

``load_preferences`` reads a prepared dataset back through Grain, checks the content hash,
and returns the option table and per-split pairs that the experiments turn into pools.
``prepared_or_prepare`` lets a command take either a prepared folder or the raw release.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nps.data.pairs import choices
from nps.data.ultrafeedback import Completions, Pairs, hh_pairs, hht_pairs, read_ultrafeedback, split_pairs
from nps.errors import ConfigError
from nps.files import file_sha256

DATASET_NAME = "ultrafeedback_preferences"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "val", "test")
RECIPES = {
    "hh": ("helpfulness", "honesty"),
    "hht": ("helpfulness", "honesty", "truthfulness"),
}


@dataclasses.dataclass(frozen=True)
class BuildParameters:
    """What a prepared dataset was built from; part of its identity."""

    recipe: str = "hh"  # "hh" (paper §5.3) or "hht" (§5.4)
    conflict_rate: float = 1.0  # HH only: the share of conflicting pairs (1.0 / 0.75 / 0.5 in §5.3)
    split_by: str = "pair"  # "pair" as the paper (a prompt may be in several splits) or "prompt"
    seed: int = 42  # the released split's seed

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe={self.recipe!r} is unknown; use one of {sorted(RECIPES)}")
        if self.recipe == "hht" and self.conflict_rate != 1.0:
            raise ConfigError("conflict_rate applies to the HH recipe only (HHT keeps pairs where one attribute "
                              "disagrees); leave it at 1.0")
        if self.split_by not in ("pair", "prompt"):
            raise ConfigError(f"split_by={self.split_by!r} is unknown; use 'pair' or 'prompt'")

    @property
    def config_name(self) -> str:
        return f"{self.recipe}-conflict{self.conflict_rate:g}-by{self.split_by}-seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class PreferenceData:
    """A prepared dataset in memory.

    options: the completions that appear in some pair (rows M), with their prompts and ratings.
    splits: {"train"|"val"|"test": Pairs} whose first/second are row ids into ``options``
    and whose choice [N, A] is 1 where ``first`` has the higher rating for that attribute.
    metadata: build parameters, content hash, source file hash, read report, split sizes.
    """

    options: Completions
    splits: dict[str, Pairs]
    metadata: dict[str, Any]
    directory: Path

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.options.attributes

    @property
    def content_hash(self) -> str:
        return self.metadata["content_hash"]

    def identity(self) -> dict[str, Any]:
        """What checkpoints and results record about the data they were trained on (not its folder,
        so a moved dataset still resumes its runs)."""
        return {
            "name": f"{DATASET_NAME}/{self.metadata['build']['recipe']}",
            "content_hash": self.content_hash,
            "build": self.metadata["build"],
            "source_sha256": self.metadata["source_sha256"],
            "split_sizes": {name: len(pairs) for name, pairs in self.splits.items()},
        }

    def require_pairs(self, needed: dict[str, int]) -> None:
        """Each split holds at least ``needed[split]`` pairs (a task's distinct targets), or an error naming it."""
        for split, count in needed.items():
            if len(self.splits[split]) < count:
                raise ConfigError(f"the {split} split has {len(self.splits[split])} pairs, fewer than a task's "
                                  f"{count} targets; use more data or fewer targets (episodes.num_targets)")

    def option_prompts(self) -> list[str]:
        return [self.options.prompts[i] for i in self.options.prompt_index]


def _content_hash(records: dict[str, dict[str, np.ndarray | list]]) -> str:
    """BLAKE2b over every split's records in order: ids, ratings (float32 bytes) and texts."""
    digest = hashlib.blake2b(digest_size=16)
    for split in SPLITS:
        columns = records[split]
        digest.update(split.encode() + len(columns["prompt_id"]).to_bytes(8, "little"))
        for name in ("prompt_id", "option_a_id", "option_b_id"):
            digest.update(np.ascontiguousarray(columns[name], np.int64).tobytes())
        for name in ("ratings_a", "ratings_b"):
            digest.update(np.ascontiguousarray(columns[name], np.float32).tobytes())
        for name in ("prompt", "response_a", "response_b"):
            for text in columns[name]:
                encoded = text.encode("utf-8") if isinstance(text, str) else bytes(text)
                digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def _split_records(completions: Completions, pairs: Pairs) -> dict[str, np.ndarray | list]:
    prompt_of = completions.prompt_index
    return {
        "prompt_id": prompt_of[pairs.first],
        "option_a_id": pairs.first,
        "option_b_id": pairs.second,
        "prompt": [completions.prompts[prompt_of[i]] for i in pairs.first],
        "response_a": [completions.responses[i] for i in pairs.first],
        "response_b": [completions.responses[i] for i in pairs.second],
        "ratings_a": completions.ratings[pairs.first].astype(np.float32),
        "ratings_b": completions.ratings[pairs.second].astype(np.float32),
    }


@functools.cache
def _builder_class():
    # Defined on first use: importing tensorflow_datasets costs seconds, and `nps --help` should not.
    import tensorflow_datasets as tfds

    class UltrafeedbackPreferences(tfds.core.GeneratorBasedBuilder):
        """UltraFeedback pairs for one recipe; the records are handed over in memory, not downloaded."""

        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "Pairs with per-attribute ratings (nps)."}

        # The records come from memory: no checksums or metadata files beside the code (and tfds's
        # lookup of them fails for an editable install).
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, records, attributes, metadata, **kwargs):
            self._records, self._attributes, self._metadata = records, attributes, metadata
            super().__init__(**kwargs)

        def _info(self):
            ratings = tfds.features.Tensor(shape=(len(self._attributes),), dtype=np.float32)
            features = tfds.features.FeaturesDict({
                "prompt_id": np.int64, "option_a_id": np.int64, "option_b_id": np.int64,
                "prompt": tfds.features.Text(), "response_a": tfds.features.Text(),
                "response_b": tfds.features.Text(), "ratings_a": ratings, "ratings_b": ratings,
            })
            return tfds.core.DatasetInfo(
                builder=self, features=features, disable_shuffling=True,
                metadata=tfds.core.MetadataDict(self._metadata),
                description="UltraFeedback preference pairs prepared by nps (see nps.data.prepared).",
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in SPLITS}

        def _generate_examples(self, split):
            columns = self._records[split]
            for row in range(len(columns["prompt_id"])):
                yield row, {name: values[row] for name, values in columns.items()}

    return UltrafeedbackPreferences


def prepare_preferences(
    source: str | Path, out: str | Path, build: BuildParameters = BuildParameters(), echo: Callable = print
) -> Path:
    """Write the recipe's pairs from the UltraFeedback file ``source`` under ``out``; returns the
    dataset's folder (``out/ultrafeedback_preferences/<config>/1.0.0``). An existing dataset with
    the same parameters and source is reused; a folder is only ever complete (tfds writes to a
    temporary folder and renames it)."""
    build.validate()
    source = Path(source)
    attributes = RECIPES[build.recipe]
    completions, report = read_ultrafeedback(source, attributes)
    echo(f"read {source}: {report.summary()}")
    pairs = hh_pairs(completions, build.conflict_rate, build.seed) if build.recipe == "hh" else hht_pairs(
        completions, build.seed)
    splits = split_pairs(pairs, completions, build.seed, by=build.split_by)
    empty = [name for name in SPLITS if not len(splits[name])]
    if empty:
        raise ConfigError(f"{source}: the {' and '.join(empty)} split would be empty ({len(pairs)} "
                          f"{build.recipe.upper()} pairs in all); prepare from more of UltraFeedback")
    records = {name: _split_records(completions, splits[name]) for name in SPLITS}
    metadata = {
        "build": dataclasses.asdict(build),
        "attributes": list(attributes),
        "source": str(source.absolute()),
        "source_sha256": file_sha256(source),
        "read_report": dataclasses.asdict(report),
        "split_sizes": {name: len(splits[name]) for name in SPLITS},
        "content_hash": _content_hash(records),
    }
    import tensorflow_datasets as tfds

    config = tfds.core.BuilderConfig(name=f"{build.config_name}-{metadata['source_sha256'][:12]}")
    builder = _builder_class()(records=records, attributes=attributes, metadata=metadata, config=config,
                               data_dir=str(Path(out).absolute()), file_format="array_record")
    directory = Path(builder.data_dir)
    if (directory / "dataset_info.json").exists() and _read_metadata(directory).get("content_hash") != metadata[
            "content_hash"]:
        raise ConfigError(f"{directory} holds a dataset with the same name but other contents; delete it and rerun")
    tfds.display_progress_bar(False)  # nps prints its own summary below
    builder.download_and_prepare()
    echo(f"{build.recipe.upper()} pairs: " + ", ".join(f"{n} {s}" for n, s in metadata["split_sizes"].items())
         + f" -> {directory} (content hash {metadata['content_hash']})")
    return directory


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / "metadata.json"
    if not path.exists():
        raise ConfigError(f"{directory}: no metadata.json; this folder was not written by `nps prepare`")
    return json.loads(path.read_text())


def find_prepared(path: str | Path) -> Path | None:
    """The dataset folder at or below ``path`` (the one with dataset_info.json), or None."""
    path = Path(path)
    if (path / "dataset_info.json").exists():
        return path
    found = sorted(p.parent for p in path.glob("**/dataset_info.json")) if path.is_dir() else []
    if len(found) > 1:
        raise ConfigError(f"{path} holds {len(found)} prepared datasets ({', '.join(map(str, found))}); pass one")
    return found[0] if found else None


def _read_split(source, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Every record of one split, column by column, read through a Grain map dataset."""
    import grain

    batches = list(grain.MapDataset.source(source).batch(batch_size))
    if not batches:
        return {}
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def load_preferences(path: str | Path) -> PreferenceData:
    """A dataset written by ``prepare_preferences`` (its folder, or a folder above it holding one)."""
    import tensorflow_datasets as tfds

    directory = find_prepared(path)
    if directory is None:
        raise ConfigError(f"{path}: no prepared dataset here; make one with `nps prepare hh --data ULTRAFEEDBACK_FILE`")
    metadata = _read_metadata(directory)
    sources = tfds.builder_from_directory(str(directory)).as_data_source()
    columns = {split: _read_split(sources[split]) for split in SPLITS}
    empty = [split for split in SPLITS if not columns[split]]
    if empty:
        raise ConfigError(f"{directory}: the {', '.join(empty)} split(s) are empty; prepare from more data")
    decoded = {
        split: {name: [t.decode("utf-8") for t in v] if v.dtype.kind in "SO" else v for name, v in c.items()}
        for split, c in columns.items()
    }
    if _content_hash(decoded) != metadata["content_hash"]:
        raise ConfigError(f"{directory}: the records do not match the content hash in metadata.json; the dataset "
                          "was changed after it was prepared: prepare it again")
    return _as_preference_data(decoded, metadata, directory)


def _as_preference_data(columns, metadata, directory: Path) -> PreferenceData:
    """The option table (each source completion once, in source order) and row-id pairs per split."""
    ids = np.concatenate([np.concatenate([c["option_a_id"], c["option_b_id"]]) for c in columns.values()])
    option_ids, first_seen = np.unique(ids, return_index=True)
    prompts_of = np.concatenate([np.concatenate([c["prompt_id"], c["prompt_id"]]) for c in columns.values()])
    texts = [t for c in columns.values() for t in c["response_a"] + c["response_b"]]
    prompt_texts = [t for c in columns.values() for t in c["prompt"] + c["prompt"]]
    ratings = np.concatenate([np.concatenate([c["ratings_a"], c["ratings_b"]]) for c in columns.values()])
    prompt_ids, prompt_index = np.unique(prompts_of[first_seen], return_inverse=True)
    prompt_first = {int(p): prompt_texts[i] for i, p in zip(first_seen, prompts_of[first_seen])}
    options = Completions(
        prompts=[prompt_first[int(p)] for p in prompt_ids],
        prompt_index=prompt_index.astype(np.int64),
        responses=[texts[i] for i in first_seen],
        ratings=ratings[first_seen].astype(np.float64),
        attributes=tuple(metadata["attributes"]),
    )
    splits = {}
    for split, c in columns.items():
        splits[split] = Pairs(
            first=np.searchsorted(option_ids, c["option_a_id"]),
            second=np.searchsorted(option_ids, c["option_b_id"]),
            choice=choices(c["ratings_a"], c["ratings_b"]),
        )
    return PreferenceData(options=options, splits=splits, metadata=metadata, directory=directory)


def prepared_or_prepare(data: str | Path, out: Path, build: BuildParameters, echo: Callable = print) -> PreferenceData:
    """``data`` is a prepared dataset (used as it is) or the UltraFeedback file (prepared under ``out``)."""
    data = Path(data)
    if not data.exists():
        raise ConfigError(f"{data}: no such file or folder; pass UltraFeedback's train file or a prepared dataset")
    if data.is_dir():
        prepared = load_preferences(data)
        for field, wanted in dataclasses.asdict(build).items():
            if prepared.metadata["build"][field] != wanted:
                raise ConfigError(
                    f"{prepared.directory} was prepared with {field}={prepared.metadata['build'][field]!r} but this "
                    f"run asks for {wanted!r}; pass --set {field}={prepared.metadata['build'][field]} or prepare again"
                )
        return prepared
    return load_preferences(prepare_preferences(data, out, build, echo))
