"""The experiments end to end: small settings by default, the paper's settings under -m slow."""

import json
import math

import numpy as np
import pytest

from nps.config import apply_overrides
from nps.data.synthetic import correlated_options, bayes_error_single_pair, correlated_pools
from nps.experiments.correlation import CorrelationConfig, conflicting_probe_pairs, run_correlation
from nps.experiments.synthetic import SyntheticConfig, run_synthetic

SMALL_MODEL = ["hidden_dim=32", "encoder.hidden_dim=32", "encoder.latent_dim=16"]
SMALL_TRAIN = ["train.steps=150", "train.eval_every=50", "train.batch_size=32", "train.learning_rate=2e-3",
               "train.val_tasks=128", "eval.num_tasks=300", "num_pairs=4000"]


def test_bayes_error_closed_form():
    assert bayes_error_single_pair(-1.0) == pytest.approx(0.0)
    assert bayes_error_single_pair(0.0) == pytest.approx(0.25)
    assert 100 * bayes_error_single_pair(-0.7) == pytest.approx(12.7, abs=0.05)
    # Against a simulation: one answered pair identifies the user when the two types disagree on it,
    # and leaves a coin toss when they agree, so the Bayes error is P(agree) / 2.
    rng = np.random.default_rng(0)
    a, b = correlated_options(rng, 200_000, 0.7), correlated_options(rng, 200_000, 0.7)
    agree = np.mean((a[:, 0] > b[:, 0]) == (a[:, 1] > b[:, 1]))
    assert bayes_error_single_pair(0.7) == pytest.approx(agree / 2, abs=0.003)


@pytest.mark.parametrize("rho", [-1.0, -0.7, 0.0, 0.7])
def test_correlated_pools_have_the_paper_conflict_rate(rho):
    pool = correlated_pools(rho, num_pairs=20_000, seed=0)["train"]
    a, b = np.asarray(pool.utility_a), np.asarray(pool.utility_b)
    conflict = np.mean((a[:, 0] > b[:, 0]) != (a[:, 1] > b[:, 1]))
    assert conflict == pytest.approx(0.5 - math.asin(rho) / math.pi, abs=0.015)
    probe_a, probe_b = conflicting_probe_pairs(rho, 100, seed=1)
    assert np.all((probe_a[:, 0] > probe_b[:, 0]) != (probe_a[:, 1] > probe_b[:, 1]))


@pytest.mark.slow  # an experiment end to end; -m slow runs it
def test_small_correlation_run_reports_errors_next_to_the_bayes_bound(tmp_path):
    overrides = SMALL_TRAIN + [f"model.{f}" for f in SMALL_MODEL] + ["train_rhos=-1.0", "test_rhos=-1.0,0.0",
                                                                     "z_error_tasks=400"]
    config = apply_overrides(CorrelationConfig(), overrides)
    results = run_correlation(config, tmp_path, progress=False, echo=lambda *_: None)
    model = results["models"]["np_btl_rho-1.0"]
    for metric in ("z_inference_error", "conflicting_pair_error"):
        assert set(model[metric]) == {"-1.0", "0.0"}
        assert model[metric]["0.0"]["bayes_optimal"] == pytest.approx(0.25)
    # A non-conflicting context pair carries no information: the error at ρ = 0 is far above ρ = −1.
    assert model["z_inference_error"]["0.0"]["mean"] > model["z_inference_error"]["-1.0"]["mean"] + 0.1
    assert json.loads((tmp_path / "results.json").read_text())["experiment"] == "correlation"


@pytest.mark.slow
def test_paper_synthetic_bars(tmp_path):
    """The issue's bars for `nps reproduce synthetic` with its defaults (about 90 s)."""
    results = run_synthetic(SyntheticConfig(), tmp_path, progress=False, echo=lambda *_: None)
    accuracy = {name: {int(n): v["all"]["mean"] for n, v in m["unseen_accuracy"].items()}
                for name, m in results["models"].items()}
    for floor, size in zip((0.85, 0.94, 0.975, 0.99), (1, 3, 5, 10)):
        assert accuracy["np_btl"][size] >= floor
    assert 0.73 <= accuracy["np_btl"][0] <= 0.78
    for name in ("btl", "dpl"):
        assert all(0.73 <= a <= 0.78 for a in accuracy[name].values())


@pytest.mark.slow
def test_paper_correlation_bars(tmp_path):
    """The ρ_tr = −1 model is within 3 points of the Bayes error at every test ρ (a few minutes)."""
    results = run_correlation(CorrelationConfig(), tmp_path, progress=False, echo=lambda *_: None)
    errors = results["models"]["np_btl_rho-1.0"]["z_inference_error"]
    for rho, error in errors.items():
        assert abs(error["mean"] - error["bayes_optimal"]) <= 0.03, rho
    # Less conflict in training identifies users worse (per-pair error on conflicting pairs).
    pair = {m["train_rho"]: m["conflicting_pair_error"] for m in results["models"].values()}
    for rho in ("-1.0", "-0.7"):
        assert pair[0.7][rho]["mean"] > pair[-1.0][rho]["mean"] + 0.03


PEERS_SMOKE = ["seeds=0,1", "learning_rates=0.002,0.003", "train.steps=20", "train.eval_every=10",
               "train.checkpoint_every=20", "train.batch_size=16", "train.val_tasks=32", "eval.num_tasks=40",
               "num_pairs=2000", "btl.hidden_dim=16", "dpl.hidden_dim=16", "np_btl.hidden_dim=16",
               "np_btl.encoder.hidden_dim=16", "np_btl.encoder.latent_dim=8", "vpl.hidden_dim=16",
               "vpl.latent_dim=8", "gpo.model_dim=16", "gpo.feedforward_dim=16", "gpo.num_layers=1", "pal_a.dim=16",
               "pal_a.adapt_steps=10", "pal_b.dim=16", "pal_b.adapt_steps=10", "lore.feature_dim=16",
               "lore.adapt_steps=10"]


def test_peers_smoke_run_reports_every_method_on_every_task(tmp_path):
    """`nps reproduce peers` end to end at toy sizes: every method and the oracle on both tasks, accuracy
    per N^C over seeds, the tuning record, the costs, a table and a plot per task, gateable by compare."""
    from nps.experiments.peers import DEFAULT_TASKS, METHOD_NAMES, ORACLE, PeersConfig, run_peers
    from nps.workflow.compare import compare_runs

    config = apply_overrides(PeersConfig(), PEERS_SMOKE)
    results = run_peers(config, tmp_path, progress=False, echo=lambda *_: None)
    assert set(results["models"]) == {f"{t}/{m}" for t in DEFAULT_TASKS for m in (*METHOD_NAMES, ORACLE)}
    for name, entry in results["models"].items():
        accuracy = entry["unseen_accuracy"]
        assert list(accuracy) == ["0", "1", "3", "5", "10"]
        assert accuracy["10"]["all"]["num_tasks"] == 2  # one value per seed
        assert all(0.0 <= cell["mean"] <= 1.0 for by_user in accuracy.values() for cell in by_user.values())
        if not name.endswith(ORACLE):
            assert entry["learning_rate"] in (0.002, 0.003)
            assert set(entry["tuning_val_nll"]) == {"0.002", "0.003"}
            assert entry["parameters"] > 0 and entry["adapt_ms_per_user"] > 0
            assert entry["adapt_gradient_steps"] == (10 if entry["kind"] in ("pal-a", "pal-b", "lore") else 0)
            if entry["kind"] in ("pal-a", "pal-b", "lore"):  # the recorded config is the one trained
                assert entry["model_config"]["num_users"] == (2 if name.startswith("two-user") else 4)
                rate = entry["learning_rate"]
                assert entry["model_config"].get("train_learning_rate", rate) == rate
    assert 0.0 <= results["models"]["two-user/vpl"]["active_latent_units"] <= 1.0
    assert len(results["models"]["four-ideal-points/np_btl"]["unseen_accuracy"]["0"]) == 5  # four types and all
    assert sorted(results["plots"]) == sorted(f"{t}.png" for t in DEFAULT_TASKS)
    tables = (tmp_path / "peers.md").read_text()
    assert all(f"| {method} |" in tables for method in METHOD_NAMES)
    gate = compare_runs(tmp_path, tmp_path)  # every accuracy of every model is gated
    assert not gate.failed and len(gate.diffs) == sum(
        len(by_user) for entry in results["models"].values() for by_user in entry["unseen_accuracy"].values())


def test_peers_tell_each_model_the_task_s_user_types_and_the_run_s_learning_rate():
    from nps.experiments.peers import PeersConfig
    from nps.models.peers import LoReConfig, PALConfig, told_the_run

    config = PeersConfig()
    assert [config.model_config(m).kind for m in ("pal-a", "pal-b", "lore")] == ["pal-a", "pal-b", "lore"]
    pal = told_the_run(PALConfig(kind="pal-b"), 4, 1e-3)
    assert pal.num_users == 4 and pal.train_learning_rate == 1e-3
    assert pal.user_learning_rate_ratio == pytest.approx(5.0)  # the release's 5e-3 at fit's 1e-3
    assert pal.logit_scale_learning_rate_ratio == pytest.approx(100.0)  # and its 0.1
    assert told_the_run(LoReConfig(), 3, 1e-3) == LoReConfig(num_users=3)
    assert told_the_run(config.np_btl, 3, 1e-3) == config.np_btl


@pytest.mark.slow  # 40 s more of the same code paths as the smoke run above, plus the z error
def test_peers_on_the_correlated_task_report_the_z_error_next_to_the_bayes_error(tmp_path):
    from nps.experiments.peers import PeersConfig, run_peers

    overrides = [o for o in PEERS_SMOKE if not o.startswith("learning_rates")]
    config = apply_overrides(PeersConfig(), overrides + ["tasks=correlated", "methods=np_btl,gpo", "oracle=false",
                                                         "learning_rates=0.003"])
    results = run_peers(config, tmp_path, progress=False, echo=lambda *_: None)
    for method in ("np_btl", "gpo"):
        error = results["models"][f"correlated/{method}"]["z_inference_error"]
        assert error["bayes_optimal"] == pytest.approx(bayes_error_single_pair(-0.7))
        assert 0.0 <= error["mean"] <= 1.0 and error["num_tasks"] == 2
    assert "Bayes 12.7" in (tmp_path / "peers.md").read_text()
