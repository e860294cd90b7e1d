"""The UltraFeedback reward-model experiments: their task samplers and groupings, and end to end
(prepare → embed → train → evaluate) on a fixture in the release's schema with a tiny random Qwen2."""

import json

import chex
import jax
import numpy as np
import pytest
from tiny_lm import write_nps_model
from uf_fixture import write_random_jsonl

from nps.cli import main
from nps.data.episodes import EpisodeSpec
from nps.data.prepared import load_preferences
from nps.data.ultrafeedback import Pairs, conflicting
from nps.experiments.ultrafeedback import conflict_test_pools, sample_with_separate_contexts, weight_cells

SMALL = [
    "dtype=float32", "embed_max_length=64", "episodes.num_targets=6", "episodes.max_context=3",
    "eval.context_sizes=0,1,3", "eval.num_tasks=40", "train.steps=4", "train.eval_every=2",
    "train.checkpoint_every=2", "train.val_tasks=8", "train.batch_size=4", "np_btl.encoder.hidden_dim=32",
    "np_btl.encoder.latent_dim=16", "np_btl.hidden_dim=32",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("uf")
    write_nps_model(root / "qwen", "qwen2", seed=4)
    return root / "qwen", write_random_jsonl(root / "train.jsonl", num_prompts=100, seed=1)


def reproduce(experiment, inputs, out, data=None, extra=()):
    model, release = inputs
    args = ["reproduce", experiment, "--model", str(model), "--data", str(data or release), "--out", str(out),
            "--quiet"]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    return main(args)


def test_weight_cells_bin_the_users_weights():
    group_2d, centres_2d = weight_cells(2, 10)
    groups, names = group_2d(np.array([[0.0, 1.0], [0.05, 0.95], [0.95, 0.05], [1.0, 0.0]]))
    np.testing.assert_array_equal(groups, [0, 0, 9, 9])
    assert names[9] == "w0 0.90-1.00" and centres_2d[names[9]] == pytest.approx((0.95,))
    group_3d, centres_3d = weight_cells(3, 4)
    groups, names = group_3d(np.array([[0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]))
    np.testing.assert_array_equal(groups, [0, 2 * 4 + 1])
    assert centres_3d[names[9]] == pytest.approx((0.625, 0.375))


def test_conflict_study_contexts_are_disjoint_from_conflicting_targets():
    rng = np.random.default_rng(0)
    ratings = rng.integers(1, 6, size=(400, 2)).astype(float)
    first, second = rng.choice(400, 300), rng.choice(400, 300)
    keep = np.all(ratings[first] != ratings[second], axis=1)
    first, second = first[keep], second[keep]
    choice = (ratings[first] > ratings[second]).astype(float)
    test = Pairs(first, second, choice)
    features = np.arange(400, dtype=np.float32)[:, None]
    for rate in (0.5, 0.75, 1.0):
        targets, contexts = conflict_test_pools(test, ratings, features, rate, seed=3)
        target_ids = set(np.asarray(targets.pairs.option_a)[:, 0] * 1000 + np.asarray(targets.pairs.option_b)[:, 0])
        context_ids = set(np.asarray(contexts.pairs.option_a)[:, 0] * 1000 + np.asarray(contexts.pairs.option_b)[:, 0])
        assert not target_ids & context_ids
        target_choice = np.asarray(targets.pairs.utility_a > targets.pairs.utility_b, float)
        context_choice = np.asarray(contexts.pairs.utility_a > contexts.pairs.utility_b, float)
        assert conflicting(target_choice).all()
        assert conflicting(context_choice).mean() == pytest.approx(rate, abs=0.02)

    spec = EpisodeSpec(num_targets=6, max_context=4)
    episodes = sample_with_separate_contexts(jax.random.key(1), (targets, contexts), spec, 32, 4)
    chex.assert_shape(episodes.context_chosen, (32, 4, 1))
    assert not np.asarray(episodes.target_in_context).any()
    # Contexts are labelled by the task's own user: the chosen option has that user's higher rating.
    user = np.asarray(episodes.user)
    chosen = np.asarray(episodes.context_chosen)[..., 0].astype(int)
    rejected = np.asarray(episodes.context_rejected)[..., 0].astype(int)
    assert np.all(ratings[chosen, user[:, None]] > ratings[rejected, user[:, None]])


def test_reproduce_hh_end_to_end_and_resume_from_the_prepared_folder(inputs, tmp_path, capsys):
    out = tmp_path / "hh"
    # (The variational NP-BTL is the same code path with another model config; tests/test_train.py trains it.)
    assert reproduce("hh", inputs, out, extra=["pca_context_sizes=1,3"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "100 of 100 prompts kept" in printed and "options/s" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"btl_mixed", "btl_helpfulness", "btl_honesty", "np_btl"}
    data = load_preferences(out / "dataset")
    assert results["data"]["content_hash"] == data.content_hash
    assert results["embedder"]["num_options"] == len(data.options.responses) and results["embedder"]["dim"] == 64
    for name, model in results["models"].items():
        assert set(model["unseen_accuracy"]) == {"0", "1", "3"}
        assert set(model["unseen_accuracy"]["0"]) == {"helpfulness", "honesty", "all"}
        assert np.isfinite(model["best_val_nll"])
        metadata = json.loads(next((out / "checkpoints" / name).glob("*/metadata/metadata")).read_text())
        assert metadata["fingerprint"]["data"]["content_hash"] == data.content_hash
    assert set(results["plots"]) == {"accuracy_vs_context.png", "np_btl_z_pca.png"}
    # A run on the prepared folder has the same data identity: it reuses the embeddings and the checkpoint.
    assert reproduce("hh", inputs, out, data=data.directory, extra=["pca_context_sizes=1,3", "models=np_btl"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["embedder"]["embedded_now"] == 0
    assert again["models"]["np_btl"]["unseen_accuracy"] == results["models"]["np_btl"]["unseen_accuracy"]


def test_peers_on_vpls_ultrafeedback_recipes_from_the_embedder_s_features(inputs, tmp_path, capsys):
    """`nps reproduce peers --set tasks=uf-p-2,uf-p-4` prepares VPL's recipes from the release file, embeds
    them once per recipe and compares the methods on them (PAL told each recipe's user types); the UF tasks
    need both inputs, said before anything trains."""
    model, release = inputs
    assert main(["reproduce", "peers", "--set", "tasks=uf-p-2", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "tasks='uf-p-2' need --data" in capsys.readouterr().err
    out = tmp_path / "peers"
    extra = ["tasks=uf-p-2,uf-p-4", "methods=vpl,pal-b", "oracle=false", "seeds=0", "learning_rates=0.003",
             "vpl.hidden_dim=16", "vpl.latent_dim=8", "pal_b.dim=16", "pal_b.adapt_steps=10"]
    assert reproduce("peers", inputs, out, extra=extra) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {f"{t}/{m}" for t in ("uf-p-2", "uf-p-4") for m in ("vpl", "pal-b")}
    users = {"uf-p-2": {"helpfulness", "honesty"},
             "uf-p-4": {"helpfulness", "honesty", "instruction_following", "truthfulness"}}
    for task, attributes in users.items():
        assert results["data"][task]["build"]["recipe"] == task
        assert results["models"][f"{task}/pal-b"]["model_config"]["num_users"] == len(attributes)
        accuracy = results["models"][f"{task}/vpl"]["unseen_accuracy"]
        assert set(accuracy) == {"0", "1", "3"} and set(accuracy["3"]) == attributes | {"all"}
        assert list((out / task / "dataset").rglob("embeddings"))  # each recipe embedded into its own folder
    assert "| vpl |" in (out / "peers.md").read_text()


@pytest.mark.slow  # an experiment end to end; -m slow runs it
def test_reproduce_conflict_and_continuum(inputs, tmp_path, capsys):
    extra = ["train_rates=0.5", "episodes.num_targets=4"]
    assert reproduce("conflict", inputs, tmp_path / "conflict", extra=extra) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "conflict" / "results.json").read_text())
    assert results["data"]["build"]["conflict_rate"] == 0.5
    for model in results["models"].values():
        by_rate = model["by_context_conflict_rate"]
        assert set(by_rate) == {"0.5", "0.75", "1"}
        # N^C = 0 sees no context, so every context rate gives the same tasks and accuracy.
        assert len({by_rate[r]["0"]["all"]["mean"] for r in by_rate}) == 1

    assert reproduce("continuum", inputs, tmp_path / "continuum", extra=["recipe=hht", "bins=4",
                                                                         "models=np_btl"]) == 0
    results = json.loads((tmp_path / "continuum" / "results.json").read_text())
    by_weight = results["models"]["np_btl"]["unseen_accuracy_by_weight"]["3"]
    cells = {k: v for k, v in by_weight.items() if k != "all"}
    assert sum(v["num_tasks"] for v in cells.values()) == by_weight["all"]["num_tasks"] == 40
    assert results["data"]["users"] == "dirichlet" and (tmp_path / "continuum" / "accuracy_by_weight.png").exists()


@pytest.mark.slow
def test_reproduce_hh_on_the_fixture_with_the_paper_defaults_takes_under_two_minutes(inputs, tmp_path, capsys):
    """Issue 5's bar: the whole pipeline (prepare → embed → four models × 450 steps → 2,000 test tasks per
    N^C → plots) on a 300-prompt fixture with the tiny embedder, under 2 minutes on 2 cores."""
    import time

    model, _ = inputs
    release = write_random_jsonl(tmp_path / "train.jsonl", num_prompts=300, seed=2)
    start = time.perf_counter()
    assert main(["reproduce", "hh", "--model", str(model), "--data", str(release), "--out", str(tmp_path / "run"),
                 "--quiet", "--set", "dtype=float32"]) == 0, capsys.readouterr().err
    seconds = time.perf_counter() - start
    print(capsys.readouterr().out)
    print(f"reproduce hh on the fixture: {seconds:.1f} s")
    assert seconds < 120


def test_the_continuum_refuses_a_recipe_whose_weights_its_cells_cannot_bin():
    """The cells bin (w₀, w₁): with UF-P-4's four attributes, users of one cell would differ in w₂ and w₃."""
    from nps.errors import ConfigError
    from nps.experiments.ultrafeedback import ContinuumConfig

    with pytest.raises(ConfigError, match="recipe='uf-p-4' has more than three attributes"):
        ContinuumConfig(recipe="uf-p-4")
    assert ContinuumConfig(recipe="hht").recipe == "hht"
