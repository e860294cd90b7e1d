"""Consistency and drift checks of a profile (nps.workflow.consistency), on models whose users are known.

``PreferenceDirection`` is a per-user preference model (``nps.models.interface``) in a few lines: z is
the unit direction of the mean (chosen − rejected) of the context, and the log-odds of a pair is
scale · z · (a − b). A simulated user of type ±1 prefers the option with the larger ±first
coordinate, so these tests know every answer's truth. The rates measured with trained NP-BTL and NP-DPO models are in
docs/results.md (`nps reproduce consistency`).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from nps.data.episodes import context_capacity
from nps.likelihood import choice_accuracy, choice_nll
from nps.models.interface import PerUserPreferenceModel
from nps.workflow.consistency import (
    _log_likelihood_table,
    check_profile,
    contradictions,
    drift_test,
    format_report,
    leave_one_out,
    position_bias,
    proposal_masks,
)


class PreferenceDirection(PerUserPreferenceModel):
    """z [B, D] = unit mean of (chosen − rejected) over the context; log-odds = scale · z · (a − b)."""

    def __init__(self, scale: float = 6.0):
        self.scale = scale

    def objective(self, episodes, key):
        log_odds = self.predict_log_odds(episodes)
        accuracy = jnp.mean(choice_accuracy(log_odds, episodes.target_mask))
        return jnp.mean(choice_nll(log_odds, episodes.target_mask)), {"accuracy": accuracy}

    def context_latent(self, episodes):
        mask = episodes.context_mask[..., None]
        mean = jnp.sum((episodes.context_chosen - episodes.context_rejected) * mask, 1) / jnp.maximum(mask.sum(1), 1)
        return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)

    def target_log_odds(self, episodes, z):
        return self.scale * jnp.einsum("btd,bd->bt", episodes.target_chosen - episodes.target_rejected, z)


def simulated_profile(rng, count, switch_at=None, flipped=()):
    """chosen, rejected [count, 2] of a user of a random type (the other type from ``switch_at`` on);
    the answers at ``flipped`` are reversed. The options of a pair differ clearly in what the types
    care about (the first coordinate), as a candidate set's pairs should."""
    a = rng.normal(size=(count, 2))
    b = a + np.stack([rng.choice([-1.0, 1.0], count) * rng.uniform(0.5, 2.0, count), rng.normal(size=count)], 1)
    sign = np.full(count, rng.choice([-1.0, 1.0]))
    if switch_at is not None:
        sign[switch_at:] *= -1
    first = sign * (a[:, 0] - b[:, 0]) > 0
    first[list(flipped)] ^= True
    chosen, rejected = np.where(first[:, None], a, b), np.where(first[:, None], b, a)
    return chosen.astype(np.float32), rejected.astype(np.float32)


def test_leave_one_out_is_the_posterior_over_the_z_of_the_other_answers():
    model = PreferenceDirection()
    chosen, rejected = simulated_profile(np.random.default_rng(0), 6)
    probabilities = leave_one_out(model, chosen, rejected, trained_context=10, subsets=8)
    masks = proposal_masks(6, subsets=8)[:, :6]
    difference = chosen - rejected
    log_likelihood = np.zeros((len(masks), 6))
    for m, mask in enumerate(masks):  # the model by hand, on unpadded answers: z_m, then every answer
        mean = difference[mask].mean(axis=0) if mask.any() else np.zeros(2)
        z = mean / max(np.linalg.norm(mean), 1e-6)
        log_likelihood[m] = -np.log1p(np.exp(-model.scale * difference @ z))
    for i in range(6):
        usable = ~masks[:, i]  # the z's that never read answer i
        evidence = log_likelihood[usable].sum(axis=1) - log_likelihood[usable, i]
        weights = np.exp(evidence - evidence.max())
        expected = np.sum(weights * np.exp(log_likelihood[usable, i])) / weights.sum()
        assert probabilities[i] == pytest.approx(expected, abs=1e-4)
    # One row per slot of the capacity (8: the two empty slots' rows read every answer and are never
    # used), then 8 halves.
    capacity = context_capacity(6)
    assert masks[:capacity].sum(axis=1).tolist() == [5] * 6 + [6] * (capacity - 6)
    assert masks[capacity:].sum(axis=1).tolist() == [3] * 8


class OneAnswerDecides(PreferenceDirection):
    """A gullible encoder: z follows the context's most decisive answer alone, so one mistaken
    answer in a context throws off the z of everything else (as an encoder that never saw a
    mistake in training may)."""

    def context_latent(self, episodes):
        difference = episodes.context_chosen - episodes.context_rejected
        strength = jnp.where(episodes.context_mask, jnp.abs(difference[..., 0]), -1.0)
        decisive = jnp.take_along_axis(difference, jnp.argmax(strength, axis=1)[:, None, None], axis=1)[:, 0]
        return decisive / jnp.maximum(jnp.linalg.norm(decisive, axis=-1, keepdims=True), 1e-6)


def test_the_posterior_finds_mistakes_that_throw_off_the_plain_leave_one_out_z():
    model, rng = OneAnswerDecides(), np.random.default_rng(8)
    found = {"plain": 0, "posterior": 0}
    for _ in range(20):
        flipped = rng.choice(15, 2, replace=False)
        chosen, rejected = simulated_profile(rng, 15, flipped=flipped)
        for name, subsets in (("plain", 0), ("posterior", 64)):
            probabilities = leave_one_out(model, chosen, rejected, trained_context=10, subsets=subsets)
            found[name] += set(np.argsort(probabilities)[:2]) == set(flipped)
    assert found["posterior"] >= 18 and found["posterior"] > found["plain"], found


def test_one_compilation_serves_every_profile_size_of_a_capacity_bucket():
    model, rng = PreferenceDirection(), np.random.default_rng(1)
    leave_one_out(model, *simulated_profile(rng, 3), trained_context=10)
    compiled = _log_likelihood_table._cache_size()
    largest = context_capacity(1)
    for count in (1, 5, largest):
        assert leave_one_out(model, *simulated_profile(rng, count), trained_context=10).shape == (count,)
    assert _log_likelihood_table._cache_size() == compiled  # 1..8 answers: one capacity, one program
    leave_one_out(model, *simulated_profile(rng, largest + 1), trained_context=10)
    assert _log_likelihood_table._cache_size() == compiled + 1


def test_a_long_profile_is_checked_in_blocks_of_the_trained_context(monkeypatch):
    # Found by issue 23: one table over every answer grew with their square (1,000 answers of the
    # steering run asked for 1.37 TB) and fed the encoder contexts 100 times those of its training.
    import nps.workflow.consistency as consistency

    model, rng = PreferenceDirection(), np.random.default_rng(9)
    chosen, rejected = simulated_profile(rng, 40)
    tables, table = [], consistency._log_likelihood_table

    def recorded_table(graphdef, state, chosen, rejected, masks):
        tables.append(masks.shape)
        return table(graphdef, state, chosen, rejected, masks)

    monkeypatch.setattr(consistency, "_log_likelihood_table", recorded_table)
    probabilities = leave_one_out(model, chosen, rejected, trained_context=10)
    assert consistency.block_size(10) == 16 and tables == [(16 + 64, 16)] * 3  # 40 answers: blocks of 14, 13, 13
    # Each block is the profile of its own answers; a profile of one block is checked as before.
    assert probabilities[:14].tolist() == leave_one_out(model, chosen[:14], rejected[:14], trained_context=10).tolist()
    assert probabilities[27:].tolist() == leave_one_out(model, chosen[27:], rejected[27:], trained_context=10).tolist()


def test_two_flipped_answers_of_fifteen_are_the_least_plausible():
    model, rng = PreferenceDirection(), np.random.default_rng(2)
    found = 0
    for _ in range(20):
        flipped = rng.choice(15, 2, replace=False)
        probabilities = leave_one_out(model, *simulated_profile(rng, 15, flipped=flipped), trained_context=10)
        found += set(np.argsort(probabilities)[:2]) == set(flipped)
    assert found >= 16  # the bar for trained models: 80 % of profiles


def test_drift_is_flagged_for_users_who_switch_and_rarely_for_stable_users():
    model, rng = PreferenceDirection(), np.random.default_rng(3)
    stable = [drift_test(model, *simulated_profile(rng, 20), seed=i) for i in range(12)]
    switched = [drift_test(model, *simulated_profile(rng, 20, switch_at=10), seed=i) for i in range(12)]
    assert sum(d.flagged for d in stable) <= 1
    assert sum(d.flagged for d in switched) >= 11
    # Where the drift starts: the first answer after the switch, within two answers.
    assert all(abs(d.change_at - 10) <= 2 for d in switched if d.flagged)
    # Most stable profiles stop drawing permutations early; their p-values are valid all the same.
    assert np.mean([d.permutations for d in stable]) < 99
    assert all(d.p_value > d.threshold for d in stable if not d.flagged)


def test_stopping_early_never_changes_the_verdict_and_a_seed_fixes_the_p_value():
    model, rng = PreferenceDirection(), np.random.default_rng(4)
    for switch_at in (None, 14, 16):
        chosen, rejected = simulated_profile(rng, 20, switch_at=switch_at)
        early = drift_test(model, chosen, rejected)
        complete = drift_test(model, chosen, rejected, stop_after=100)
        assert early.flagged == complete.flagged and complete.permutations == 99
        assert drift_test(model, chosen, rejected).p_value == early.p_value


def test_drift_needs_enough_answers_and_reads_only_the_window():
    model, rng = PreferenceDirection(), np.random.default_rng(5)
    few = drift_test(model, *simulated_profile(rng, 5))
    assert few.statistic is None and not few.flagged and few.needed == 6
    # A switch long before the window is not drift within it.
    old_switch = drift_test(model, *simulated_profile(rng, 40, switch_at=5), window=20)
    assert old_switch.analysed == 20 and not old_switch.flagged and min(old_switch.split_statistics) == 23


def test_answers_given_both_ways_and_position_bias():
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
             {"prompt": "p", "chosen": "b", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert contradictions(pairs) == [(0, 2), (2, 3)]
    assert position_bias([None, None]) == (0, 0, None, False)
    biased = position_bias(["first"] * 9 + ["second", None])
    assert biased.first == 9 and biased.answered == 10 and biased.p_value == pytest.approx(0.021484375)
    assert biased.flagged and not position_bias(["first", "second"] * 5).flagged


def test_the_report_lists_implausible_answers_and_drift_in_words():
    model, rng = PreferenceDirection(), np.random.default_rng(6)
    chosen, rejected = simulated_profile(rng, 20, switch_at=12)
    pairs = [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)]
    report = check_profile(model, pairs, chosen, rejected, ["first"] * 20, trained_context=10)
    text = format_report(report, "me.jsonl")
    assert "me.jsonl: 20 answers" in text and "DRIFT: the answers from #13 on" in text
    assert "a position bias" in text and f"#{report.implausible[0] + 1} p = " in text
    saved = report.to_json()
    assert saved["drift"]["change_at"] == 13 and len(saved["leave_one_out"]) == 20
    assert saved["leave_one_out"][0]["answer"] == 1 and saved["implausible"][0] == report.implausible[0] + 1


@pytest.mark.parametrize("stochastic", [False, True])
def test_np_btl_reward_models_plug_in_as_they_are(stochastic):
    """The library reads NP-BTL through its own interface: deterministic z, or the mean of q(z | C)."""
    import dataclasses

    from nps.models.reward import SYNTHETIC_NP_BTL, build_reward_model

    config = dataclasses.replace(SYNTHETIC_NP_BTL, encoder=dataclasses.replace(SYNTHETIC_NP_BTL.encoder,
                                                                                stochastic=stochastic))
    model = build_reward_model(1, config, seed=0)
    chosen, rejected = (x[:, :1] for x in simulated_profile(np.random.default_rng(7), 7))
    probabilities = leave_one_out(model, chosen, rejected, trained_context=10)
    drift = drift_test(model, chosen, rejected, permutations=9)
    assert probabilities.shape == (7,) and np.all((probabilities > 0) & (probabilities < 1))
    assert np.isfinite(drift.statistic) and 0 < drift.p_value <= 1


@pytest.mark.slow
def test_trained_np_btl_meets_the_bars_on_the_synthetic_task(tmp_path):
    """`nps reproduce consistency` on the synthetic task (NP-BTL, 1,000 steps), 40 users of each kind."""
    from nps.cli import main

    assert main(["reproduce", "consistency", "--out", str(tmp_path), "--quiet", "--set", "tasks=synthetic",
                 "--set", "candidate_sets=conflicting", "--set", "num_users=40"]) == 0
    study = json.loads((tmp_path / "results.json").read_text())["tasks"]["synthetic"]["conflicting"]
    assert study["stable_flagged"]["mean"] <= 0.10  # the bar is 5 %; 40 users leave room for chance
    assert study["switching_flagged_at_any_look"]["mean"] >= 0.90
    assert study["flipped_are_least_plausible"]["mean"] >= 0.80
