"""Prepared preference datasets: UltraFeedback pairs written once as a versioned tfds dataset.

``prepare_preferences`` reads the release, builds the recipe's pairs (HH or HHT, a conflict
rate, a seeded 80/10/10 split) and writes them with a tensorflow-datasets builder in the
array_record format, which needs no TensorFlow (docs/design.md). Each example is one pair:
the prompt, both responses, their per-attribute ratings and their ids in the source file.
The dataset's metadata holds the build parameters (recipe, conflict rate, split, seed, the
source file's hash, what reading skipped) and a content hash over every split's records;
every checkpoint and results.json trained on the data records that hash. One process at a
time writes a dataset (an exclusive lock on its config folder); tfds writes into an
``incomplete.*`` folder and renames it when done, and such a folder left by a killed run is
never taken for a dataset and is removed by the next ``nps prepare`` of that config. Nothing
is looked up remotely and nothing is left outside the dataset's folder.

``load_preferences`` reads a prepared dataset back through Grain, checks its metadata and
content hash, and returns the option table and per-split pairs that the experiments turn into
pools. It reads with nps's own builder class, whose features are defined in code: the folder's
``features.json`` (whose ``pythonClassName`` tfds would import) is never used.
``prepared_or_prepare`` lets a command take either a prepared folder or the raw release, and
``embedded_preferences`` is what every UltraFeedback experiment reads: that dataset and its
options' features from a frozen embedder (cached beside it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from nps.data.embedding_cache import embed_options_cached, embedder_identity
from nps.data.pairs import choices
from nps.data.ultrafeedback import (
    Completions,
    Pairs,
    controversial_pairs,
    hh_pairs,
    hht_pairs,
    read_ultrafeedback,
    split_pairs,
)
from nps.errors import ConfigError
from nps.files import Digest, exclusive_lock, file_sha256
from nps.train.distributed import primary_first

INCOMPLETE_PREFIX = "incomplete."  # tfds's name for a dataset folder still being written
DATASET_NAME = "ultrafeedback_preferences"
DATASET_VERSION = "1.0.0"
SPLITS = ("train", "val", "test")
RECIPES = {  # recipe -> its user types (attributes)
    "hh": ("helpfulness", "honesty"),
    "hht": ("helpfulness", "honesty", "truthfulness"),
    "uf-p-2": ("helpfulness", "honesty"),  # VPL's UltraFeedback recipes (docs/peers.md)
    "uf-p-4": ("helpfulness", "honesty", "instruction_following", "truthfulness"),
}


@dataclasses.dataclass(frozen=True)
class BuildParameters:
    """What a prepared dataset was built from; part of its identity."""

    recipe: str = "hh"  # "hh" (paper §5.3), "hht" (§5.4), or VPL's "uf-p-2" / "uf-p-4"
    conflict_rate: float = 1.0  # HH only: the share of conflicting pairs (1.0 / 0.75 / 0.5 in §5.3)
    split_by: str = "pair"  # "pair" as the paper (a prompt may be in several splits) or "prompt"
    seed: int = 42  # the released split's seed

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe={self.recipe!r} is unknown; use one of {sorted(RECIPES)}")
        if self.recipe != "hh" and self.conflict_rate != 1.0:
            raise ConfigError(f"conflict_rate applies to the HH recipe only ({self.recipe.upper()} keeps pairs "
                              "where the attributes disagree); leave it at 1.0")
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
    digest = Digest()
    for split in SPLITS:
        columns = records[split]
        digest.raw(split.encode() + len(columns["prompt_id"]).to_bytes(8, "little"))
        for name in ("prompt_id", "option_a_id", "option_b_id"):
            digest.raw(np.asarray(columns[name], np.int64).tobytes())
        for name in ("ratings_a", "ratings_b"):
            digest.raw(np.asarray(columns[name], np.float32).tobytes())
        for name in ("prompt", "response_a", "response_b"):
            for text in columns[name]:
                digest.framed(text.encode("utf-8") if isinstance(text, str) else bytes(text))
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


class _NoDownloads:
    """Stands in for tfds's download manager: the records come from memory, so nothing is downloaded
    and no ``downloads/`` folder is made."""

    downloaded_size = 0


# The private tensorflow_datasets internals that nps's builder replaces (no tfds release promises them):
# where a dataset lives, the download manager, the "Downloading ..." banners, the lookup of checksum files
# beside the code, the dataset's metadata on GCS. pyproject.toml pins the tfds releases they are tested on
# (tests/test_prepared.py checks the installed one, and their signatures); and each must still exist, or the
# builder would silently download, print and look up remotely again.
TFDS_HOOKS = (
    ("core.DatasetBuilder", "_build_data_dir"),
    ("core.DatasetBuilder", "_make_download_manager"),
    ("core.DatasetBuilder", "_log_download_bytes"),
    ("core.DatasetBuilder", "_log_download_done"),
    ("core.DatasetBuilder", "code_path"),
    ("core.DatasetInfo", "initialize_from_bucket"),
)


def _tested_tfds() -> str:
    """The tensorflow-datasets requirement nps was installed with (pyproject.toml's range)."""
    import importlib.metadata

    try:
        return next(r for r in importlib.metadata.requires("nps") or () if r.startswith("tensorflow-datasets"))
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        return "the tensorflow-datasets range in nps's pyproject.toml"


def _check_tfds_hooks(tfds) -> None:
    """Each internal in ``TFDS_HOOKS`` exists in the installed tfds, or one line naming it and the fix."""
    for owner, name in TFDS_HOOKS:
        cls = functools.reduce(getattr, owner.split("."), tfds)
        if not any(name in vars(base) for base in cls.__mro__):  # not hasattr: that would run a property
            raise ConfigError(f"tensorflow-datasets {tfds.__version__} has no {owner}.{name}, which nps's dataset "
                              f"builder replaces; install a release nps is tested on: pip install "
                              f"'{_tested_tfds()}'")


def _builder_class():
    """nps's tfds builder class, once the installed tfds is checked (``TFDS_HOOKS``)."""
    import tensorflow_datasets as tfds

    _check_tfds_hooks(tfds)
    return _define_builder_class()


@functools.cache  # tfds registers a builder class by its name: define it once
def _define_builder_class():
    # Defined on first use: importing tensorflow_datasets costs seconds, and `nps --help` should not.
    import tensorflow_datasets as tfds

    class LocalDatasetInfo(tfds.core.DatasetInfo):
        def initialize_from_bucket(self) -> None:
            """tfds looks a new dataset's metadata up on GCS (through a temporary folder it never
            removes); an nps dataset has none there, so nothing is looked up."""

    class UltrafeedbackPreferences(tfds.core.GeneratorBasedBuilder):
        """UltraFeedback pairs for one recipe; the records are handed over in memory, not downloaded.

        ``builder_dir``: read the prepared dataset in that folder (wherever it was moved) instead of
        ``data_dir/<name>/<config>/<version>``; the features always come from ``_info`` (code), never
        from the folder's features.json.
        """

        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "Pairs with per-attribute ratings (nps)."}

        # The records come from memory: no checksums or metadata files beside the code (and tfds's
        # lookup of them fails for an editable install).
        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, records, attributes, metadata, builder_dir: Path | None = None, **kwargs):
            self._records, self._attributes, self._metadata = records, attributes, metadata
            self._builder_dir = builder_dir
            super().__init__(**kwargs)

        def _build_data_dir(self, given_data_dir):
            if self._builder_dir is not None:
                return str(self._builder_dir), str(self._builder_dir)
            return super()._build_data_dir(given_data_dir)

        def _make_download_manager(self, download_dir, download_config):
            return _NoDownloads()

        # tfds prints "Downloading and preparing ..." where nothing is downloaded; nps prints its own summary.
        def _log_download_bytes(self) -> None:
            pass

        def _log_download_done(self) -> None:
            pass

        def _info(self):
            ratings = tfds.features.Tensor(shape=(len(self._attributes),), dtype=np.float32)
            features = tfds.features.FeaturesDict({
                "prompt_id": np.int64, "option_a_id": np.int64, "option_b_id": np.int64,
                "prompt": tfds.features.Text(), "response_a": tfds.features.Text(),
                "response_b": tfds.features.Text(), "ratings_a": ratings, "ratings_b": ratings,
            })
            return LocalDatasetInfo(
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
    source: str | Path, out: str | Path, build: BuildParameters = BuildParameters(), echo: Callable = print, *,
    strict: bool = False,
) -> Path:
    """Write the recipe's pairs from the UltraFeedback file ``source`` under ``out``; returns the
    dataset's folder (``out/ultrafeedback_preferences/<config>/1.0.0``). An existing dataset with
    the same parameters and source is reused; a folder is only ever complete (tfds writes to a
    temporary folder and renames it). ``strict``: a malformed record is an error, not skipped."""
    build.validate()
    source = Path(source)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file; pass a folder for the prepared dataset (--out)")
    attributes = RECIPES[build.recipe]
    completions, report = read_ultrafeedback(source, attributes, strict=strict)
    echo(f"read {source}: {report.summary()}")
    if build.recipe == "hh":
        pairs = hh_pairs(completions, build.conflict_rate, build.seed)
    else:
        pairs = (hht_pairs if build.recipe == "hht" else controversial_pairs)(completions, build.seed)
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
    config_dir = out.absolute() / DATASET_NAME / config.name
    config_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(config_dir, f"the prepared dataset {config_dir}"):
        for unfinished in sorted(config_dir.glob(f"{INCOMPLETE_PREFIX}*")):
            shutil.rmtree(unfinished)  # the lock says no live `nps prepare` is writing it
            echo(f"removed {unfinished}, an unfinished dataset left by an interrupted `nps prepare`")
        directory = config_dir / DATASET_VERSION
        if (directory / "dataset_info.json").exists() and _read_metadata(directory)["content_hash"] != metadata[
                "content_hash"]:
            raise ConfigError(f"{directory} holds a dataset with the same name but other contents; delete it and "
                              "rerun")
        builder = _builder_class()(records=records, attributes=attributes, metadata=metadata, config=config,
                                   data_dir=str(out.absolute()), file_format="array_record")
        tfds.display_progress_bar(False)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    echo(f"{build.recipe.upper()} pairs: " + ", ".join(f"{n} {s}" for n, s in metadata["split_sizes"].items())
         + f" -> {directory} (content hash {metadata['content_hash']})")
    return directory


def _read_metadata(directory: Path) -> dict[str, Any]:
    """metadata.json of a prepared dataset, checked field by field (it drives the reading)."""
    path = directory / "metadata.json"
    if not path.exists():
        raise ConfigError(f"{directory}: no metadata.json; this folder was not written by `nps prepare`")
    fix = "this folder was not written by `nps prepare` or was changed since: delete it and prepare again"
    try:
        metadata = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(metadata, dict):
        raise ConfigError(f"{path}: not a JSON object; {fix}")
    build = metadata.get("build")
    if not isinstance(build, dict) or set(build) != {f.name for f in dataclasses.fields(BuildParameters)}:
        raise ConfigError(f"{path}: 'build' is missing or lacks build parameters; {fix}")
    try:
        BuildParameters(**build).validate()
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: 'build' is invalid ({exc}); {fix}") from None
    if metadata.get("attributes") != list(RECIPES[build["recipe"]]):
        raise ConfigError(f"{path}: 'attributes' {metadata.get('attributes')!r} are not the {build['recipe']} "
                          f"recipe's {list(RECIPES[build['recipe']])}; {fix}")
    for field in ("content_hash", "source_sha256"):
        if not isinstance(metadata.get(field), str):
            raise ConfigError(f"{path}: {field!r} is missing or not a string; {fix}")
    sizes = metadata.get("split_sizes")
    if not isinstance(sizes, dict) or set(sizes) != set(SPLITS) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes.values()):
        raise ConfigError(f"{path}: 'split_sizes' must give a positive count for each of {list(SPLITS)}; {fix}")
    return metadata


def find_prepared(path: str | Path) -> Path | None:
    """The dataset folder at or below ``path`` (the one with dataset_info.json), or None. Folders that
    tfds was still writing (``incomplete.*``, left by a killed ``nps prepare``) are not datasets."""
    path = Path(path)
    if any(part.startswith(INCOMPLETE_PREFIX) for part in path.absolute().parts):
        raise ConfigError(f"{path}: an unfinished dataset left by an interrupted `nps prepare`; prepare it again "
                          "(that also removes this folder)")
    if (path / "dataset_info.json").exists():
        return path
    found = sorted(p.parent for p in path.glob("**/dataset_info.json")
                   if not any(part.startswith(INCOMPLETE_PREFIX) for part in p.relative_to(path).parts)) \
        if path.is_dir() else []
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
    directory = find_prepared(path)
    if directory is None:
        raise ConfigError(f"{path}: no prepared dataset here; make one with `nps prepare hh --data ULTRAFEEDBACK_FILE`")
    metadata = _read_metadata(directory)
    again = "delete the folder and prepare it again"
    try:
        builder = _builder_class()(records=None, attributes=metadata["attributes"], metadata={},
                                   builder_dir=directory.absolute(), file_format="array_record")
        sources = builder.as_data_source()
    except Exception as exc:  # tfds raises many types (JSON, protobuf, assertion, file errors)
        raise ConfigError(f"{directory / 'dataset_info.json'}: not a valid description of this dataset "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {again}") from None
    listed = [split for split in SPLITS if split in builder.info.splits]
    if listed != list(SPLITS):
        missing = ", ".join(s for s in SPLITS if s not in listed)
        raise ConfigError(f"{directory / 'dataset_info.json'}: lists no {missing} split; {again}")
    columns = {}
    for split in SPLITS:
        try:
            columns[split] = _read_split(sources[split])
        except Exception as exc:  # array_record's and the example parser's errors have no common base
            files = ", ".join(p.name for p in sorted(directory.glob(f"*-{split}.array_record*")))
            raise ConfigError(f"{directory}/{files or split}: the {split} split cannot be read "
                              f"({type(exc).__name__}); the file is damaged: {again}") from None
    sizes = {split: len(c.get("prompt_id", ())) for split, c in columns.items()}
    if sizes != metadata["split_sizes"]:
        raise ConfigError(f"{directory}: the splits hold {sizes} records but metadata.json says "
                          f"{metadata['split_sizes']}; {again}")
    try:
        decoded = {
            split: {name: [t.decode("utf-8") for t in v] if v.dtype.kind in "SO" else v for name, v in c.items()}
            for split, c in columns.items()
        }
    except UnicodeDecodeError:
        decoded = None
    if decoded is None or _content_hash(decoded) != metadata["content_hash"]:
        raise ConfigError(f"{directory}: the records do not match the content hash in metadata.json; the dataset "
                          f"was changed after it was prepared: {again}")
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


class EmbeddedPreferences(NamedTuple):
    """A prepared dataset and its options' features [M, D] (rows of ``data.options``), the embedder's
    record (``embed_options_cached``), and the data identity that checkpoints and results carry."""

    data: PreferenceData
    features: np.ndarray
    embedder: dict[str, Any]
    identity: dict[str, Any]


def embedded_preferences(data: str | Path, embedder: str | Path, out: Path, build: BuildParameters,
                         needed_pairs: dict[str, int], *, dtype: str, max_length: int, batch_size: int,
                         echo: Callable = print) -> EmbeddedPreferences:
    """The UltraFeedback experiments' inputs: ``data`` prepared as ``build`` asks (a prepared folder, or
    the raw file prepared under ``out/dataset``), each split holding at least ``needed_pairs[split]``
    pairs, and its options embedded by ``embedder`` (cached beside the dataset). Process 0 writes the
    dataset and the cache first; the other processes of a run then read them."""
    prepared = primary_first(lambda: prepared_or_prepare(data, out / "dataset", build, echo), "dataset")
    prepared.require_pairs(needed_pairs)
    features, record = primary_first(lambda: embed_options_cached(
        str(embedder), prepared.option_prompts(), prepared.options.responses, prepared.directory / "embeddings",
        dtype=dtype, max_length=max_length, batch_size=batch_size, echo=echo), "embeddings")
    return EmbeddedPreferences(prepared, features, record,
                               prepared.identity() | {"embedder": embedder_identity(record)})
