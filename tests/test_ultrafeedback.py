"""UltraFeedback reading and pair recipes against counts worked out by hand on tests/uf_fixture.py."""

import jax
import numpy as np
import pytest
from uf_fixture import write_jsonl, write_parquet

from nps.data.ultrafeedback import (
    all_pairs,
    hh_pairs,
    hht_pairs,
    read_ultrafeedback,
    split_pairs,
)
from nps.errors import ConfigError

HHT = ("helpfulness", "honesty", "truthfulness")


@pytest.fixture(params=["jsonl", "parquet"])
def release(request, tmp_path):
    writer = write_jsonl if request.param == "jsonl" else write_parquet
    return writer(tmp_path / f"train.{request.param}")


def test_reading_skips_and_counts_bad_records(release):
    completions, report = read_ultrafeedback(release, HHT)
    # p2 (one answer) and p3 (one answer left after the empty response) are dropped.
    assert (report.prompts_read, report.prompts_kept, report.prompts_with_fewer_than_two_answers) == (6, 4, 2)
    assert (report.completions_kept, report.completions_missing_response, report.completions_unrated) == (11, 1, 1)
    assert completions.prompts == ["question p0", "question p1", "question p4", "question p5"]
    np.testing.assert_array_equal(completions.ratings[3:6], [[2, 2, 2], [2, 5, 4], [4, 1, 5]])  # p1 without "N/A"
    assert "4 of 6 prompts kept" in report.summary()


def test_all_pairs_and_choices(release):
    pairs = all_pairs(read_ultrafeedback(release, HHT)[0])
    assert len(pairs) == 3 + 3 + 1 + 3
    # p0 (first, second) pairs: (a, b), (a, c), (b, c); 1 = first better, 0 = second, 0.5 = tie.
    np.testing.assert_array_equal(pairs.choice[:3], [[1, 0, 0.5], [1, 0, 1], [1, 0, 1]])
    np.testing.assert_array_equal(pairs.choice[3:6], [[0.5, 0, 0], [0, 1, 0], [0, 1, 0]])  # p1: a, b, d
    np.testing.assert_array_equal(pairs.choice[6], [0, 0.5, 0])  # p4: tied on honesty


def test_hh_drops_ties_and_sets_the_conflict_rate(release):
    completions, _ = read_ultrafeedback(release, ("helpfulness", "honesty"))
    # Untied on both: p0's 3 pairs and p1's (a, d), (b, d) conflict (5); p5's 3 pairs agree.
    assert len(hh_pairs(completions, 1.0)) == 5
    assert np.all(hh_pairs(completions, 1.0).choice.sum(axis=1) == 1)
    half = hh_pairs(completions, 0.5)  # int(5 · 0.5) = 2 conflicting + int(5 · 0.5) = 2 agreeing
    assert len(half) == 4 and int(np.sum(half.choice.sum(axis=1) == 1)) == 2
    three_quarters = hh_pairs(completions, 0.75)  # int(3.75) = 3 conflicting + int(1.25) = 1 agreeing
    assert len(three_quarters) == 4 and int(np.sum(three_quarters.choice.sum(axis=1) == 1)) == 3
    with pytest.raises(ConfigError, match="conflict_rate=0.2 needs 4 non-conflicting pairs but only 3 exist"):
        hh_pairs(completions, 0.2)


def test_hht_keeps_pairs_where_one_attribute_disagrees(release):
    pairs = hht_pairs(read_ultrafeedback(release, HHT)[0])
    # Untied on all three: p0 (a, c), (b, c) and p1 (a, d), (b, d) disagree; p5's three agree.
    assert len(pairs) == 4 and set(pairs.choice.sum(axis=1)) <= {1.0, 2.0}


def test_recipes_are_deterministic_in_their_seed(release):
    completions, _ = read_ultrafeedback(release, ("helpfulness", "honesty"))
    a, b = (hh_pairs(completions, 0.5, seed=s) for s in (1, 1))
    np.testing.assert_array_equal(a.first, b.first)
    assert any(not np.array_equal(hh_pairs(completions, 0.5, seed=s).first, a.first) for s in range(2, 8))


def test_splits_are_exact_and_by_prompt_keeps_prompts_apart():
    from nps.data.ultrafeedback import Completions

    rng = np.random.default_rng(0)
    prompt_index = np.repeat(np.arange(250), 4)
    completions = Completions([f"q{i}" for i in range(250)], prompt_index, ["r"] * 1000, rng.normal(size=(1000, 2)),
                              ("helpfulness", "honesty"))
    pairs = all_pairs(completions)  # 250 prompts × 6 pairs
    by_pair = split_pairs(pairs, completions, seed=0)
    assert [len(by_pair[s]) for s in ("train", "val", "test")] == [1200, 150, 150]
    by_prompt = split_pairs(pairs, completions, seed=0, by="prompt")
    assert [len(by_prompt[s]) for s in ("train", "val", "test")] == [200 * 6, 25 * 6, 25 * 6]
    prompts = {s: set(prompt_index[p.first]) for s, p in by_prompt.items()}
    assert not (prompts["train"] & prompts["val"]) and not (prompts["train"] & prompts["test"])


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such file; download UltraFeedback"):
        read_ultrafeedback(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "q", "completions": []}\n{not json\n')
    with pytest.raises(ConfigError, match=r"broken.jsonl:2: not JSON; fix or delete this record"):
        read_ultrafeedback(broken, strict=True)
    with pytest.raises(ConfigError, match="attributes \\['helpfullness'\\] are not UltraFeedback's"):
        read_ultrafeedback(broken, ("helpfullness",))


def test_pair_pool_utilities_reproduce_the_choices(release):
    from nps.data.episodes import EpisodeSpec, sample_episodes
    from nps.data.ultrafeedback import option_pair_pool

    completions, _ = read_ultrafeedback(release, HHT)
    pairs = hh_pairs(completions, 0.5)
    features = np.arange(len(completions.responses), dtype=np.float32)[:, None].repeat(3, 1)
    pool = option_pair_pool(pairs, completions.ratings[:, :2], features)
    first_better = (np.asarray(pool.pairs.utility_a) > np.asarray(pool.pairs.utility_b)).astype(float)
    np.testing.assert_array_equal(first_better, pairs.choice)
    np.testing.assert_array_equal(np.asarray(pool.pairs.option_a)[:, 0], pairs.first)
    # Sampled episodes gather the option rows: the chosen option is the one the user type rates higher.
    episodes = sample_episodes(jax.random.key(0), pool, EpisodeSpec(num_targets=4, max_context=2), 16)
    chosen = np.asarray(episodes.target_chosen)[..., 0].astype(int)
    rejected = np.asarray(episodes.target_rejected)[..., 0].astype(int)
    user = np.asarray(episodes.user)[:, None]
    assert np.all(completions.ratings[chosen, user] > completions.ratings[rejected, user])
    with pytest.raises(ConfigError, match="the option table has 3 rows but there are 11 rated options"):
        option_pair_pool(pairs, completions.ratings[:, :2], features[:3])


def test_a_release_subset_is_the_first_records_of_a_downloaded_file(tmp_path, monkeypatch):
    import huggingface_hub

    from nps.data.ultrafeedback import download_release_subset, write_random_release

    release = write_random_release(tmp_path / "evol_instruct.jsonl", 7)
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name, repo_type: asked.append((repo, name, repo_type)) or str(release))
    subset = download_release_subset(tmp_path / "data", 5)
    assert asked == [("openbmb/UltraFeedback", "evol_instruct.jsonl", "dataset")]
    assert subset == tmp_path / "data" / "ultrafeedback-evol_instruct-5.jsonl"
    assert subset.read_text().splitlines() == release.read_text().splitlines()[:5]
    assert read_ultrafeedback(subset)[1].prompts_kept == 5
    assert download_release_subset(tmp_path / "data", 100).name == "ultrafeedback-evol_instruct-7.jsonl"


def test_an_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from nps.data.ultrafeedback import download_release_subset

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read at import
    with pytest.raises(ConfigError, match=r"^openbmb/UltraFeedback/flan.jsonl: could not download from the "
                                          r"Hugging Face hub \(\w+\); download UltraFeedback elsewhere "
                                          r"and pass the file$"):
        download_release_subset(tmp_path, 10, "flan.jsonl")


@pytest.mark.parametrize("attributes", [("helpfulness", "honesty"),
                                        ("helpfulness", "honesty", "instruction_following", "truthfulness")])
def test_vpl_recipes_keep_the_pairs_on_which_some_attribute_prefers_each_side(release, attributes):
    """UF-P-2 / UF-P-4: a pair stays when one attribute strictly prefers each side; ties stay (the coin's)."""
    from nps.data.ultrafeedback import controversial_pairs

    completions, _ = read_ultrafeedback(release, attributes)
    every, kept = all_pairs(completions), controversial_pairs(completions, seed=3)
    expected = {(f, s) for f, s, c in zip(every.first, every.second, every.choice) if 1.0 in c and 0.0 in c}
    assert set(zip(kept.first, kept.second)) == expected and len(kept) == len(expected)
    if len(attributes) == 2:  # two attributes: exactly HH's conflicting pairs
        assert expected == set(zip(*(hh_pairs(completions, 1.0).first, hh_pairs(completions, 1.0).second)))
    else:
        assert any(0.5 in c for c in kept.choice)  # a tie on a third attribute is kept
