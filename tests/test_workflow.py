"""The preference workflow: collecting a profile, choosing informative pairs, comparing runs."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nps.active import (
    expected_information_gain,
    log_weights_after,
    most_informative,
    next_informative,
    update_log_weights,
)
from nps.cli import main
from nps.data.episodes import context_capacity
from nps.data.profiles import collect, read_candidates, read_pairs, read_profile
from nps.errors import ConfigError
from nps.workflow.compare import compare_runs


# -- collect ---------------------------------------------------------------------------------------
def write_candidates(path, count=4):
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "responses": [f"long answer {i}", f"short {i}"]})
                              for i in range(count)) + "\n")
    return path


def prefers_long(prompt, first, second):
    return "first" if first.startswith("long") else "second"


def test_collect_records_choices_whatever_the_display_order(tmp_path):
    candidates = write_candidates(tmp_path / "candidates.jsonl", 6)
    shown = []
    records = collect(candidates, tmp_path / "me.jsonl", lambda p, a, b: shown.append(a) or prefers_long(p, a, b))
    assert len(records) == 6 and all(r["chosen"].startswith("long") for r in records)
    # The display order is randomised (seeded): "long" is shown first for some candidates, second for others.
    assert 0 < sum(s.startswith("long") for s in shown) < 6
    pairs = read_pairs(tmp_path / "me.jsonl")
    assert pairs[0] == {"prompt": "q0", "chosen": "long answer 0", "rejected": "short 0"}
    _, digest = read_candidates(candidates)
    assert {r["candidates"] for r in read_profile(tmp_path / "me.jsonl")} == {digest}


def test_an_interrupted_session_keeps_its_answers_and_resumes(tmp_path):
    candidates = write_candidates(tmp_path / "candidates.jsonl", 5)
    profile = tmp_path / "me.jsonl"
    answers = iter(["skip", "first", "quit"])

    def first_then_crash(prompt, first, second):
        answer = next(answers)
        if answer == "quit":
            raise KeyboardInterrupt  # the person closes the terminal mid-question
        return answer

    with pytest.raises(KeyboardInterrupt):
        collect(candidates, profile, first_then_crash)
    kept = read_profile(profile)
    assert [r.get("choice") for r in kept] == ["skip", None] and len(read_pairs(profile)) == 1
    asked = []
    collect(candidates, profile, lambda p, a, b: asked.append(p) or "second")
    assert asked == ["q2", "q3", "q4"]  # neither the skipped nor the answered candidate is asked again
    assert len(read_pairs(profile)) == 4


def test_bad_profiles_and_candidates_get_clear_messages(tmp_path):
    candidates = write_candidates(tmp_path / "candidates.jsonl")
    profile = tmp_path / "me.jsonl"
    collect(candidates, profile, prefers_long, limit=1)
    other = write_candidates(tmp_path / "other.jsonl", 3)
    with pytest.raises(ConfigError, match="comes from candidate set .* use a new profile"):
        collect(other, profile, prefers_long)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no answered pairs; collect some with `nps collect`"):
        read_pairs(tmp_path / "empty.jsonl", allow_empty=False)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: field 'rejected' is missing"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "bad_candidates.jsonl").write_text('{"prompt": "q", "responses": ["only one"]}\n')
    with pytest.raises(ConfigError, match="bad_candidates.jsonl:1: needs a 'prompt' string and 'responses'"):
        read_candidates(tmp_path / "bad_candidates.jsonl")


def test_collect_command_with_scripted_choices(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "candidates.jsonl", 3)
    (tmp_path / "choices.txt").write_text("1\ns\n2\n")
    profile = tmp_path / "me.jsonl"
    assert main(["collect", "--candidates", str(candidates), "--profile", str(profile),
                 "--choices", str(tmp_path / "choices.txt")]) == 0
    assert len(read_profile(profile)) == 3 and len(read_pairs(profile)) == 2
    assert "2 answered, 1 skipped" in capsys.readouterr().out


# -- most informative pair -------------------------------------------------------------------------
def test_information_gain_is_zero_where_plausible_users_agree_and_log2_where_they_split():
    # Two equally plausible users; pair 0: both unsure (0.5); pair 1: both sure of a; pair 2: they disagree.
    probabilities = jnp.array([[0.5, 0.99, 0.999], [0.5, 0.99, 0.001]])
    gain = expected_information_gain(jnp.zeros((1, 2)), probabilities)[0]
    np.testing.assert_allclose(gain[:2], 0.0, atol=1e-6)
    np.testing.assert_allclose(gain[2], np.log(2) - 2 * (-0.999 * np.log(0.999) - 0.001 * np.log(0.001)) / 2,
                               rtol=1e-4)
    assert int(most_informative(jnp.zeros((1, 2)), probabilities, jnp.zeros((1, 3), bool))[0]) == 2
    assert int(most_informative(jnp.zeros((1, 2)), probabilities, jnp.array([[False, False, True]]))[0]) in (0, 1)
    # After the answer "a" on pair 2 the first user is (almost) certain; nothing is left to learn.
    log_weights = update_log_weights(jnp.zeros((1, 2)), probabilities, jnp.array([2]), jnp.array([True]))
    chex.assert_trees_all_close(jax.nn.softmax(log_weights)[0], jnp.array([0.999, 0.001]), atol=1e-6)
    assert float(expected_information_gain(log_weights, probabilities)[0, 2]) < 0.01


def test_the_next_question_is_the_most_informative_then_the_given_order_then_none():
    # Pair 2 splits the two plausible users; pairs 0, 1 and 3 tell them apart not at all.
    probabilities = jnp.array([[0.5, 0.99, 0.999, 0.7], [0.5, 0.99, 0.001, 0.7]])
    uniform = jnp.zeros((1, 2))
    assert next_informative(uniform, probabilities, set(), order=[3, 1, 0, 2]) == 2
    # Nothing informative is left: the first unasked candidate of the order (the app's per-person order,
    # `collect --active`'s file order), never the argmax over pairs every user ranks alike.
    assert next_informative(uniform, probabilities, {2}, order=[3, 1, 0, 2]) == 3
    assert next_informative(uniform, probabilities, {2, 3}, order=range(4)) == 0
    assert next_informative(uniform, probabilities, {0, 1, 2, 3}, order=range(4)) is None


# empty, inside the first bucket, at its end, past it
@pytest.mark.parametrize("count", [0, 5, context_capacity(1), context_capacity(1) + 1])
def test_a_posterior_rebuilt_from_answers_is_the_one_updated_answer_by_answer(count):
    # The app rebuilds a person's posterior from their profile after a restart and updates it live
    # after each answer: the two must agree exactly, whatever bucket the answers are padded to.
    probabilities = jax.random.uniform(jax.random.key(0), (64, 40), minval=0.01, maxval=0.99)
    answers = [(int(i), bool(b)) for i, b in zip(np.random.default_rng(count).permutation(40)[:count],
                                                 np.random.default_rng(count + 1).random(count) < 0.5)]
    live = jnp.zeros((1, 64))
    for index, first in answers:
        live = update_log_weights(live, probabilities, np.array([index]), np.array([first]))
    rebuilt = log_weights_after(probabilities, answers)
    chex.assert_shape(rebuilt, (1, 64))
    np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(live))
    if count:
        assert float(jnp.std(rebuilt)) > 0  # the answers moved the weights


# -- compare ---------------------------------------------------------------------------------------
def write_run(path, accuracy, sem=0.005, content_hash="abc", error=0.1):
    path.mkdir(parents=True, exist_ok=True)
    entry = {"unseen_accuracy": {"10": {"honesty": {"mean": accuracy, "sem": sem, "num_tasks": 1000},
                                        "all": {"mean": accuracy, "sem": sem, "num_tasks": 2000}}},
             "z_inference_error": {"0.0": {"mean": error, "sem": sem, "num_tasks": 1000}},
             "history": [{"step": 1, "val_nll": {"mean": 9, "sem": 0}}]}
    results = {"schema_version": 1, "experiment": "hh", "data": {"content_hash": content_hash},
               "models": {"np_btl": entry}}
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_compare_flags_only_significant_regressions_beyond_the_tolerance(tmp_path):
    base = write_run(tmp_path / "a", 0.72)
    assert not compare_runs(base, write_run(tmp_path / "b", 0.71)).regressions  # within the tolerance
    assert not compare_runs(base, write_run(tmp_path / "c", 0.69, sem=0.05)).regressions  # within the noise
    worse = compare_runs(base, write_run(tmp_path / "d", 0.69))
    assert {d.name for d in worse.regressions} == {"np_btl/unseen_accuracy/10/honesty", "np_btl/unseen_accuracy/10/all"}
    assert worse.diffs[0].difference == pytest.approx(-0.03) and worse.diffs[0].sem == pytest.approx(0.005 * 2**0.5)
    # Errors regress upwards; a better accuracy is not a regression.
    error = compare_runs(base, write_run(tmp_path / "e", 0.80, error=0.2))
    assert [d.name for d in error.regressions] == ["np_btl/z_inference_error/0.0"]
    assert all("history" not in d.name for d in error.diffs)


def test_compare_command_exits_non_zero_on_a_regression_and_refuses_other_data(tmp_path, capsys):
    base = write_run(tmp_path / "a", 0.72)
    assert main(["compare", str(base), str(write_run(tmp_path / "b", 0.72))]) == 0
    report = tmp_path / "report.md"
    assert main(["compare", str(base), str(write_run(tmp_path / "c", 0.60)), "--markdown", str(report)]) == 1
    assert "REGRESSION" in capsys.readouterr().out and "| np_btl/unseen_accuracy/10/all |" in report.read_text()
    other = write_run(tmp_path / "d", 0.72, content_hash="other")
    assert main(["compare", str(base), str(other)]) == 2
    assert "trained on different data" in capsys.readouterr().err
    assert main(["compare", str(base), str(other), "--allow-different-data"]) == 0


def test_pairs_needed_is_the_first_answer_count_at_the_target():
    from nps.active import pairs_needed

    accuracy = np.array([[0.5, 0.9, 0.96, 0.99], [0.5, 0.7, 0.8, 0.9], [0.97, 0.5, 0.5, 0.5]])
    np.testing.assert_array_equal(pairs_needed(accuracy, 0.95), [2, 4, 0])  # 4 = never within 3 answers


@pytest.mark.slow  # a small `nps reproduce active` end to end; -m slow runs it
def test_active_choice_needs_fewer_answers_than_random_on_the_synthetic_task(tmp_path, capsys):
    settings = ["tasks=synthetic", "synthetic_train.steps=150", "synthetic_train.eval_every=50",
                "synthetic_train.checkpoint_every=50", "eval.num_tasks=50", "eval.context_sizes=0,1",
                "num_users=40", "num_candidates=50", "num_eval_pairs=100", "num_particles=64", "max_pairs=6",
                "reference_pairs=4"]
    args = ["reproduce", "active", "--out", str(tmp_path), "--quiet"]
    for item in settings:
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr().err
    task = json.loads((tmp_path / "results.json").read_text())["tasks"]["synthetic"]
    needed = task["pairs_needed"]
    # One conflicting pair identifies a synthetic user; random choice finds one only half the time.
    assert needed["active"]["mean"] < needed["random"]["mean"]
    curves = task["accuracy_vs_pairs"]
    assert curves["active"][0] == curves["random"][0]  # before any answer both are the same model and users
    assert len(curves["active"]) == 7 and (tmp_path / "accuracy_vs_answered_pairs.png").exists()


def test_collect_in_a_terminal_reads_keys_and_quits_keeping_answers(tmp_path, monkeypatch, capsys):
    from nps.data.profiles import ask_in_terminal

    candidates = write_candidates(tmp_path / "candidates.jsonl", 3)
    keys = iter(["x", "2", "q"])  # an invalid key is asked again
    monkeypatch.setattr("builtins.input", lambda prompt: next(keys))
    records = collect(candidates, tmp_path / "me.jsonl", ask_in_terminal)
    assert len(records) == 1 and "=== prompt ===\nq0" in capsys.readouterr().out
    assert len(read_pairs(tmp_path / "me.jsonl")) == 1
