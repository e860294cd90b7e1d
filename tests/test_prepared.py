"""Prepared datasets (tfds array_record, read through Grain): round trip, versioning, refusals."""

import functools
import inspect
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from uf_fixture import write_jsonl, write_random_jsonl

from nps.cli import main
from nps.data.prepared import (
    RECIPES,
    TFDS_HOOKS,
    BuildParameters,
    load_preferences,
    prepare_preferences,
    prepared_or_prepare,
)
from nps.data.ultrafeedback import controversial_pairs, hh_pairs, hht_pairs, read_ultrafeedback, split_pairs
from nps.errors import ConfigError


def quiet(_):
    pass


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_random_jsonl(tmp_path_factory.mktemp("uf") / "train.jsonl", num_prompts=60, seed=3)


@pytest.mark.parametrize("build", [BuildParameters(), BuildParameters("hh", 0.75, "prompt", 7), BuildParameters("hht"),
                                   BuildParameters("uf-p-2"), BuildParameters("uf-p-4", split_by="prompt")])
def test_round_trip_reproduces_the_recipe(release, tmp_path, build):
    attributes = RECIPES[build.recipe]
    completions, _ = read_ultrafeedback(release, attributes)
    if build.recipe == "hh":
        pairs = hh_pairs(completions, build.conflict_rate, build.seed)
    else:
        pairs = {"hht": hht_pairs, "uf-p-2": controversial_pairs, "uf-p-4": controversial_pairs}[build.recipe](
            completions, build.seed)
    expected = split_pairs(pairs, completions, build.seed, by=build.split_by)

    data = load_preferences(prepare_preferences(release, tmp_path, build, echo=quiet))
    assert data.attributes == attributes
    assert data.metadata["split_sizes"] == {name: len(p) for name, p in expected.items()}
    for name, want in expected.items():
        got = data.splits[name]
        # Same pairs in the same order: compare the texts and ratings of both options.
        texts = lambda rows, table: [table[i] for i in rows]  # noqa: E731
        assert texts(got.first, data.options.responses) == texts(want.first, completions.responses)
        assert texts(got.second, data.options.responses) == texts(want.second, completions.responses)
        np.testing.assert_array_equal(data.options.ratings[got.first], completions.ratings[want.first])
        np.testing.assert_array_equal(got.choice, want.choice)
        prompts = data.option_prompts()
        assert [prompts[i] for i in got.first] == [completions.prompts[completions.prompt_index[i]] for i in want.first]
    # Every option appears once in the table.
    assert len(set(zip(data.option_prompts(), data.options.responses))) == len(data.options.responses)


def test_versioning_hash_is_stable_and_recorded(release, tmp_path):
    first = load_preferences(prepare_preferences(release, tmp_path / "a", echo=quiet))
    second = load_preferences(prepare_preferences(release, tmp_path / "b", echo=quiet))
    other_seed = load_preferences(prepare_preferences(release, tmp_path / "a", BuildParameters(seed=1), echo=quiet))
    assert first.content_hash == second.content_hash != other_seed.content_hash
    identity = first.identity()
    assert identity["build"] == {"recipe": "hh", "conflict_rate": 1.0, "split_by": "pair", "seed": 42}
    assert len(identity["source_sha256"]) == 64 and "directory" not in identity
    # Preparing again reuses the folder; a parent folder with two datasets must be disambiguated.
    assert prepare_preferences(release, tmp_path / "b", echo=quiet) == second.directory
    with pytest.raises(ConfigError, match="holds 2 prepared datasets"):
        load_preferences(tmp_path / "a")


def test_refusals_name_the_problem(release, tmp_path):
    directory = prepare_preferences(release, tmp_path, echo=quiet)
    with pytest.raises(ConfigError, match="prepared with conflict_rate=1.0 but this run asks for 0.5"):
        prepared_or_prepare(directory, tmp_path / "other", BuildParameters(conflict_rate=0.5))
    with pytest.raises(ConfigError, match="no prepared dataset here; make one with `nps prepare"):
        load_preferences(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="conflict_rate applies to the HH recipe only"):
        prepare_preferences(release, tmp_path, BuildParameters("hht", 0.5))
    metadata = json.loads((directory / "metadata.json").read_text())
    metadata["content_hash"] = "0" * 32
    (directory / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ConfigError, match="do not match the content hash"):
        load_preferences(directory)


def test_tiny_release_refuses_empty_splits(tmp_path):
    # The hand-made fixture has 5 HH pairs: int(0.8·5) = 4 train, int(0.1·5) = 0 val, 1 test.
    with pytest.raises(ConfigError, match="the val split would be empty"):
        prepare_preferences(write_jsonl(tmp_path / "train.jsonl"), tmp_path / "out", echo=quiet)
    assert not (tmp_path / "out").exists()


def test_prepare_command(release, tmp_path, capsys):
    assert main(["prepare", "hht", "--data", str(release), "--out", str(tmp_path), "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "HHT pairs: train" in printed
    data = load_preferences(tmp_path)
    assert data.metadata["build"]["seed"] == 5 and data.metadata["read_report"]["prompts_read"] == 60


# -- the tfds releases the builder is tested on ---------------------------------------------------------
# The parameters of each private tfds internal that nps's builder replaces, as in the releases pyproject.toml
# allows (code_path: a class property, no parameters). A release that changes one fails here.
TESTED_HOOKS = {
    "_build_data_dir": ["self", "given_data_dir"],
    "_make_download_manager": ["self", "download_dir", "download_config"],
    "_log_download_bytes": ["self"],
    "_log_download_done": ["self"],
    "code_path": None,
    "initialize_from_bucket": ["self"],
}


def test_the_installed_tfds_is_a_release_the_builder_is_tested_on():
    import tensorflow_datasets as tfds

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    required = next(Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("tensorflow-datasets"))
    assert any(spec.operator in ("<", "<=", "==") for spec in required.specifier), "tfds needs an upper bound"
    assert tfds.__version__ in required.specifier, (tfds.__version__, str(required.specifier))
    assert [name for _, name in TFDS_HOOKS] == list(TESTED_HOOKS)
    for owner, name in TFDS_HOOKS:
        cls = functools.reduce(getattr, owner.split("."), tfds)
        defined = next(vars(base)[name] for base in cls.__mro__ if name in vars(base))
        if TESTED_HOOKS[name] is None:
            assert isinstance(defined, tfds.core.utils.classproperty), name
        else:
            assert list(inspect.signature(defined).parameters) == TESTED_HOOKS[name], name


def test_a_tfds_without_an_internal_the_builder_replaces_is_refused_in_one_line(release, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.delattr(tfds.core.DatasetBuilder, "_log_download_done")  # as a release that renamed it
    with pytest.raises(ConfigError, match=rf"tensorflow-datasets {tfds.__version__} has no "
                                          r"core\.DatasetBuilder\._log_download_done, which nps's dataset builder "
                                          r"replaces; install a release nps is tested on: pip install "
                                          r"'tensorflow-datasets.*4\.9\.1"):
        prepare_preferences(release, tmp_path, BuildParameters(), echo=quiet)
    assert not any(tmp_path.rglob("dataset_info.json"))  # no dataset was written
