"""The steering experiment end to end on small settings, `nps generate`, and the language's ground truth."""

from __future__ import annotations

import json
import math
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from event_files import TRAINING_TAGS, steps

from nps.cli import main
from nps.config import apply_overrides
from nps.data import two_styles
from nps.data.pairs import choices, conflicting
from nps.errors import ConfigError
from nps.experiments.steering import SteeringConfig, base_model, run_steering
from nps.steering_run import SteeringRun


def test_rewards_and_conflicts_follow_the_word_counts():
    detail, cautious, neutral = two_styles.DETAILED_IDS, two_styles.CAUTIOUS_IDS, two_styles.NEUTRAL_IDS
    eos, pad = two_styles.EOS, two_styles.PAD
    responses = np.asarray([
        [detail[0], detail[1], cautious[0], eos, pad, detail[2]],  # words after <eos> do not count
        [cautious[0], cautious[1], neutral[0], eos, pad, pad],
    ])
    np.testing.assert_array_equal(two_styles.user_rewards(responses), [[2, 1], [0, 2]])
    np.testing.assert_allclose(two_styles.detail_share(responses), [2 / 3, 0.0])
    first, second = two_styles.user_rewards(responses[:1]), two_styles.user_rewards(responses[1:])
    assert conflicting(choices(first, second))[0]
    assert not conflicting(choices(first, first))[0]


def test_corpus_is_well_formed():
    spec = two_styles.LanguageSpec()
    tokens, mask = two_styles.sample_corpus(np.random.default_rng(0), 200, spec)
    assert tokens.shape == (200, spec.sequence_length)
    assert (tokens[:, 0] == two_styles.BOS).all() and (tokens[:, 3] == two_styles.SEP).all()
    assert (np.sum(tokens == two_styles.EOS, axis=1) == 1).all()
    lengths = np.argmax(tokens == two_styles.EOS, axis=1) - two_styles.PROMPT_LENGTH
    assert lengths.min() >= spec.min_words and lengths.max() <= spec.min_words + spec.extra_words
    np.testing.assert_array_equal(mask, tokens != two_styles.PAD)


def test_unknown_words_are_named():
    with pytest.raises(ConfigError, match="pair.prompt: 'quantum' is not a word of the steering language"):
        two_styles.option_tokens("quantum physics", "example")


@pytest.fixture(scope="module")
def small_run(steering_notebook):
    """notebooks/steering.ipynb, executed top to bottom (tests/steering_fixture.py): it runs the experiment on
    small settings. Its run is shared with other tests, which only read it."""
    assert steering_notebook.images == 3
    return steering_notebook.run, steering_notebook.printed


def test_small_run_writes_results_plots_and_adapts(small_run):
    out, printed = small_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == "steering" and set(saved["models"]) == set(SteeringConfig().models)
    for plot in saved["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["data"]["split_sizes"]["train"] > 0.75 * saved["data"]["conflicting_pairs"]
    accuracy = saved["models"]["np_dpo"]["unseen_accuracy"]
    assert accuracy["3"]["all"]["mean"] > accuracy["0"]["all"]["mean"] + 0.1  # the context steers
    vpl = saved["models"]["vpl_dpo"]["unseen_accuracy"]  # VPL's latent steers the same policy too
    assert vpl["3"]["all"]["mean"] > vpl["0"]["all"]["mean"] + 0.1
    assert saved["models"]["vpl_dpo"]["kind"] == "vpl" and set(saved["win_rates"]["vpl_dpo"]) == {"0", "3"}
    mixed = saved["models"]["btl_dpo_mixed"]["unseen_accuracy"]
    assert mixed["0"]["all"]["mean"] == pytest.approx(mixed["3"]["all"]["mean"], abs=0.05)
    for user in ("detail", "caution"):
        oracle = saved["models"][f"oracle_{user}"]["unseen_accuracy"]["0"][user]["mean"]
        assert oracle > 0.8, (user, oracle)
    assert set(saved["win_rates"]["np_dpo"]) == {"0", "3"} and set(saved["win_rates"]["oracle_detail"]) == {"0"}
    assert len(saved["continuum"]["detail_share"]) == 3
    assert "win vs base" in printed and "caution user:" in printed
    # A token model's curves: the training tags at every chunk, and tokens/s for chunks that compiled nothing.
    curves = steps(out / "logs" / "np_dpo")
    every = saved["config"]["train"]["eval_every"]
    chunks = list(range(every, saved["config"]["train"]["steps"] + 1, every))
    assert len(chunks) >= 2 and all(curves[tag] == chunks for tag in TRAINING_TAGS), curves
    assert curves["perf/tokens_per_second"] and set(curves["perf/tokens_per_second"]) <= set(chunks[1:])


def write_profiles(folder):
    """A detail-preferring user's two pairs, and a caution-preferring user's one."""
    detail = folder / "detail.jsonl"
    detail.write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "physics music", "chosen": "example step detail further", "rejected": "perhaps unsure caveat"},
        {"prompt": "cooking law", "chosen": "first then finally", "rejected": "might possibly verify"},
    ]))
    caution = folder / "caution.jsonl"
    caution.write_text(json.dumps({"prompt": "chess travel", "chosen": "perhaps caveat", "rejected": "example step"}))
    return detail, caution


def test_generate_command_and_python_api(small_run, tmp_path, capsys):
    out, _ = small_run
    detail, caution = write_profiles(tmp_path)
    assert main(["generate", "--run", str(out), "--prompt", "physics music", "--prompt", "chess law",
                 "--context", str(detail), "--toward", str(caution), "--points", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("# w = ") for line in lines) == 3
    assert sum(" => " in line for line in lines) == 6

    run = SteeringRun.load(out)
    z = run.encode_user([json.loads(line) for line in detail.read_text().splitlines()])
    assert z.shape == (SteeringConfig().policy.encoder.latent_dim,)
    empty = run.encode_user([])
    assert np.isfinite(np.asarray(empty)).all() and np.abs(np.asarray(z - empty)).max() > 0
    replies = run.generate(["physics music", "chess law"] * 8, z, seed=1)
    assert all(two_styles.encode_words(reply) is not None for reply in replies)  # words of the language
    assert len(set(replies)) > 1  # sampled, not one fixed answer
    # The implicit reward of a detailed answer relative to a cautious one is higher for the detail user.
    z_caution = run.encode_user([json.loads(caution.read_text())])

    def preference_for_detail(user_z):
        return (run.log_prob("physics music", "example step detail further", user_z)
                - run.log_prob("physics music", "perhaps unsure caveat might", user_z))

    assert preference_for_detail(z) > preference_for_detail(z_caution)
    with pytest.raises(ConfigError, match=r"z has non-finite values"):
        run.generate(["physics music"], z.at[0].set(jnp.nan))
    positions = run.base.config.max_position_embeddings
    with pytest.raises(ConfigError, match=rf"prompts\[0\] has \d+ tokens plus \d+ to generate, more than this model's {positions} positions"):
        run.generate([" ".join(["physics"] * positions)], z)
    with pytest.raises(ConfigError, match=rf"pairs\[0\] has \d+ tokens, more than this model's {positions} positions"):
        run.encode_user([{"prompt": "physics", "chosen": " ".join(["example"] * 5000), "rejected": "perhaps"}])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "physics", "chosen": "example"}\n')
    assert main(["generate", "--run", str(out), "--prompt", "physics music", "--context", str(bad)]) == 2
    assert f"{bad}:1: field 'rejected' is missing" in capsys.readouterr().err
    assert main(["generate", "--run", str(tmp_path), "--prompt", "physics music"]) == 2
    assert "run `nps reproduce steering" in capsys.readouterr().err


def test_vpl_dpo_is_served_by_every_downstream_command_as_np_dpo_is(small_run, tmp_path, capsys):
    """VPL-DPO's run loads by name: its z is VPL's posterior mean (the prior's 0 with no pairs, where FiLM
    is the identity), it steers generation and the implicit reward, and `profile check` reads it."""
    out, _ = small_run
    detail, caution = write_profiles(tmp_path)
    run = SteeringRun.load(out, "vpl_dpo")
    assert run.conditioned and run.policy.config.kind == "vpl"
    assert run.fingerprint != SteeringRun.load(out).fingerprint
    np.testing.assert_array_equal(run.encode_user([]), 0.0)
    z_detail = run.encode_user([json.loads(line) for line in detail.read_text().splitlines()])
    z_caution = run.encode_user([json.loads(caution.read_text())])
    assert z_detail.shape == (SteeringConfig().policy.vpl.latent_dim,)
    assert float(jnp.max(jnp.abs(z_detail))) <= SteeringConfig().policy.vpl.clamp

    def preference_for_detail(user_z):
        return (run.log_prob("physics music", "example step detail further", user_z)
                - run.log_prob("physics music", "perhaps unsure caveat might", user_z))

    assert preference_for_detail(z_detail) > preference_for_detail(z_caution)
    assert main(["generate", "--run", str(out), "--model", "vpl_dpo", "--prompt", "physics music",
                 "--context", str(detail), "--samples", "2"]) == 0
    assert sum(" => " in line for line in capsys.readouterr().out.splitlines()) == 2
    assert main(["profile", "check", str(detail), "--run", str(out), "--model", "vpl_dpo"]) == 0
    assert "2 answers" in capsys.readouterr().out


def test_generate_refuses_numbers_it_cannot_use_and_warns_far_from_training(small_run, tmp_path, capsys):
    # Issue 23: each was accepted; NaN and 32 × 1e30 printed empty responses with exit 0.
    out, _ = small_run
    command = ["generate", "--run", str(out), "--prompt", "physics music"]
    for flags, message in ((["--samples", "0"], "--samples 0 must be at least 1"),
                           (["--samples", "-1"], "--samples -1 must be at least 1"),
                           (["--points", "0"], "--points 0 must be at least 2"),
                           (["--temperature", "nan"], "temperature=nan must be a finite number >= 0 (0 is greedy)")):
        assert main(command + flags) == 2
        assert capsys.readouterr() == ("", f"nps: error: {message}\n")  # nothing printed before the refusal
    for temperature in (math.inf, -1.0):
        with pytest.raises(ConfigError, match="must be a finite number >= 0"):
            two_styles.sampling(two_styles.LanguageSpec(), temperature)
    latent_dim = SteeringConfig().policy.encoder.latent_dim
    booleans = tmp_path / "booleans.json"
    booleans.write_text(json.dumps([True] * latent_dim))
    assert main(command + ["--z-file", str(booleans)]) == 2
    assert capsys.readouterr().err.startswith(f"nps: error: {booleans}: z must be a JSON list of {latent_dim} numbers "
                                              "(this policy's latent size), not [true, true")
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps([1e30] * latent_dim))
    with pytest.warns(UserWarning, match=rf"{huge}: z reaches 1e\+30, far outside \[-?\d.*\] where the encoder puts"):
        assert main(command + ["--z-file", str(huge), "--temperature", "0"]) == 0  # 0: greedy, a valid temperature


def test_a_z_file_is_a_list_of_the_latent_size_of_finite_numbers(tmp_path):
    from types import SimpleNamespace

    from nps.workflow.generate import read_z_file

    # What read_z_file reads of a run: the latent size, and where the encoder puts the run's users.
    run = SimpleNamespace(policy=SimpleNamespace(config=SimpleNamespace(encoder=SimpleNamespace(latent_dim=3))),
                          latent_range=lambda: (-1.0, 1.0))
    path = tmp_path / "z.json"
    for text, message in (("[1, 2", "not a JSON list of numbers"), ("[1, 2]", "z must be a JSON list of 3 numbers"),
                          ('{"z": [1, 2, 3]}', "z must be a JSON list of 3 numbers"),
                          ("[1, NaN, 0]", "z has non-finite values (NaN or inf)")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            read_z_file(path, run)
    path.write_text("[0.5, -2.5, 3]")  # within the users' range, widened by its width on each side
    np.testing.assert_array_equal(read_z_file(path, run), [0.5, -2.5, 3.0])
    path.write_text("[0, 0, 3.5]")
    with pytest.warns(UserWarning, match=r"z reaches 3\.5, far outside \[-1, 1\]"):
        read_z_file(path, run)


def test_rerun_reuses_the_pretrained_base(small_run):
    out, _ = small_run
    printed = []
    base_model(apply_overrides(SteeringConfig(), []), out, printed.append)
    assert printed == []  # no second pretraining


@pytest.mark.slow
def test_default_steering_run_meets_the_bars(tmp_path):
    results = run_steering(SteeringConfig(), tmp_path, progress=False, echo=lambda *_: None)
    assert results["wall_clock_seconds"] < 15 * 60
    accuracy = {name: model["unseen_accuracy"] for name, model in results["models"].items()}
    rates = results["win_rates"]
    for user in ("detail", "caution"):
        oracle = accuracy[f"oracle_{user}"]["10"][user]["mean"]
        assert accuracy["np_dpo"]["10"][user]["mean"] >= oracle - 0.05
        assert rates["np_dpo"]["10"][user]["mean"] >= rates[f"oracle_{user}"]["0"][user]["mean"] - 0.10
        assert rates["np_dpo"]["10"][user]["mean"] > rates["np_dpo"]["0"][user]["mean"] + 0.2
    assert abs(accuracy["np_dpo"]["0"]["all"]["mean"] - accuracy["btl_dpo_mixed"]["0"]["all"]["mean"]) < 0.1
    shares = [s["mean"] for s in results["continuum"]["detail_share"]]
    assert all(a > b for a, b in zip(shares, shares[1:])), shares


@pytest.fixture
def ab_inputs(small_run, tmp_path):
    out, _ = small_run
    detail, caution = write_profiles(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("physics music\nchess law\nbiology poetry\n")
    return out, ["ab", "--run", str(out), "--profile", f"detail={detail}", "--profile", f"caution={caution}",
                 "--prompts", str(prompts), "--samples", "4"]


def test_ab_report_counts_every_generation_and_is_reproducible(ab_inputs, tmp_path, capsys):
    _, args = ab_inputs
    assert main([*args, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert "| detail | 1 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "ab.json").read_text())
    assert set(report["by_user_type"]) == {"detail", "caution"}
    assert report["by_user_type"]["detail"]["win_rate"]["num_tasks"] == 12  # 3 prompts × 4 samples
    assert report["by_profile"][0]["profile_sha256"] and (tmp_path / "a" / "ab.png").exists()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "ab.json").read_text())["by_user_type"] == report["by_user_type"]


def test_a_policy_against_itself_ties_exactly(ab_inputs, tmp_path):
    out, args = ab_inputs
    # The same policy, profiles and seeds generate the same responses: every pair ties, a win rate of ½ ± 0.
    assert main([*args, "--out", str(tmp_path), "--baseline", f"{out}:np_dpo"]) == 0
    itself = json.loads((tmp_path / "ab.json").read_text())["by_user_type"]
    assert all(entry["win_rate"]["mean"] == 0.5 and entry["win_rate"]["sem"] == 0.0 for entry in itself.values())


def test_ab_names_the_user_types_it_knows(ab_inputs, tmp_path, capsys):
    out, args = ab_inputs
    prompts = args[args.index("--prompts") + 1]
    assert main(["ab", "--run", str(out), "--profile", f"honest={tmp_path}/x.jsonl", "--prompts", prompts]) == 2
    assert "write USER_TYPE=PATH with USER_TYPE one of ['detail', 'caution']" in capsys.readouterr().err


def test_the_np_btl_scorer_is_trained_once_and_reused(ab_inputs, tmp_path):
    shared, args = ab_inputs
    out = tmp_path / "run"  # the scorer is trained into the run: a copy, since other tests share it
    shutil.copytree(shared, out, ignore=shutil.ignore_patterns("logs"))
    args = [str(out) if arg == str(shared) else arg for arg in args]
    assert main([*args, "--out", str(tmp_path / "d"), "--scorer", "np_btl", "--scorer-steps", "40"]) == 0
    learned = json.loads((tmp_path / "d" / "ab.json").read_text())
    assert learned["inputs"]["scorer"] == "NP-BTL conditioned on the profile"
    assert set(learned["scorer_unseen_accuracy"]["0"]) == {"detail", "caution", "all"}
    checkpoints = sorted(p.name for p in (out / "checkpoints" / "np_btl_reward").iterdir())
    assert main([*args, "--out", str(tmp_path / "e"), "--scorer", "np_btl", "--scorer-steps", "40"]) == 0
    again = json.loads((tmp_path / "e" / "ab.json").read_text())
    assert again == learned | {"inputs": again["inputs"]}  # the same scorer, the same numbers
    assert sorted(p.name for p in (out / "checkpoints" / "np_btl_reward").iterdir()) == checkpoints


@pytest.mark.parametrize("scorer, name", [("vpl", "VPL"), ("lore", "LoRe")])
def test_a_peer_reward_model_scores_the_ab_test_and_checks_a_profile(ab_inputs, tmp_path, capsys, scorer, name):
    """Any per-user reward model scores `nps ab` (LoRe fits each profile's mixture at test time), and the
    scorer it trained checks a profile; GPO, with no reward per option, is refused by name."""
    shared, args = ab_inputs
    out = tmp_path / "run"
    shutil.copytree(shared, out, ignore=shutil.ignore_patterns("logs"))
    args = [str(out) if arg == str(shared) else arg for arg in args]
    assert main([*args, "--out", str(tmp_path / "ab"), "--scorer", "gpo"]) == 2
    assert "--scorer 'gpo': use 'oracle' or one of ['np_btl', 'vpl', 'pal-a', 'pal-b', 'lore']" in \
        capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "ab"), "--scorer", scorer, "--scorer-steps", "30"]) == 0
    report = json.loads((tmp_path / "ab" / "ab.json").read_text())
    assert report["inputs"]["scorer"] == f"{name} conditioned on the profile"
    assert set(report["scorer_unseen_accuracy"]) == {"0", "1", "3", "5", "10"}
    rewards = [entry["mean_reward"] for entry in report["by_profile"]]
    assert all(np.isfinite([r["personalised"], r["baseline"]]).all() for r in rewards)
    assert len({r["personalised"] for r in rewards}) == 2  # each profile its own user state
    checkpoint = f"{scorer.replace('-', '_')}_reward"
    assert (out / "checkpoints" / checkpoint).is_dir()
    profile = args[args.index("--profile") + 1].partition("=")[2]
    assert main(["profile", "check", profile, "--run", str(out), "--model", checkpoint]) == 0
    assert "answers" in capsys.readouterr().out


def test_peers_on_the_steering_reward_task_read_the_steering_run(small_run, tmp_path):
    """`nps reproduce peers --set tasks=steering`: every method on the steering run's pairs (options as its
    encoder's features, the same pools `nps ab`'s scorers train on), its two user types, its data identity."""
    from nps.experiments.peers import PeersConfig, run_peers

    out, _ = small_run
    config = apply_overrides(PeersConfig(), [
        "tasks=steering", f"steering_run={out}", "methods=np_btl,pal-b", "seeds=0", "learning_rates=0.003",
        "train.steps=20", "train.eval_every=10", "train.checkpoint_every=20", "train.batch_size=8",
        "train.val_tasks=16", "eval.num_tasks=40", "eval.context_sizes=0,3", "np_btl.hidden_dim=16",
        "np_btl.encoder.hidden_dim=16", "np_btl.encoder.latent_dim=8", "pal_b.dim=16", "pal_b.adapt_steps=10"])
    results = run_peers(config, tmp_path / "peers", progress=False, echo=lambda *_: None)
    run = SteeringRun.load(out)
    assert results["data"]["steering"] == run.data.identity
    assert set(results["models"]) == {f"steering/{m}" for m in ("np_btl", "pal-b", "per_type_oracle")}
    for entry in results["models"].values():
        assert set(entry["unseen_accuracy"]["3"]) == {"detail", "caution", "all"}
    assert results["models"]["steering/pal-b"]["model_config"]["num_users"] == 2
    assert not (tmp_path / "peers" / "steering").exists()  # the given run is read, not retrained


def test_collect_asks_a_pair_that_separates_the_users_first(small_run, tmp_path, capsys):
    from nps.data.profiles import read_profile

    out, _ = small_run
    # Two pairs every user ranks alike (no cautious words in either), then two on which they disagree.
    candidates = [
        {"prompt": "physics music", "responses": ["example step", "example step detail further"]},
        {"prompt": "cooking law", "responses": ["first then", "first then finally also"]},
        {"prompt": "chess travel", "responses": ["example step detail", "perhaps unsure caveat"]},
        {"prompt": "biology poetry", "responses": ["might possibly verify", "first then finally"]},
    ]
    path = tmp_path / "candidates.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in candidates) + "\n")
    (tmp_path / "choices.txt").write_text("1\n")
    profile = tmp_path / "me.jsonl"
    assert main(["collect", "--candidates", str(path), "--profile", str(profile), "--choices",
                 str(tmp_path / "choices.txt"), "--active", str(out)]) == 0, capsys.readouterr().err
    assert [r["candidate"] for r in read_profile(profile)][0] in (2, 3)
