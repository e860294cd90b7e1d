"""docs/api.md runs as written: its code blocks, top to bottom, in one namespace."""

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.fixture(scope="module")
def namespace():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    names, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), names)
    names["printed"] = printed.getvalue()
    return names


def test_the_custom_task_has_three_users_and_an_exact_split(namespace):
    pools = namespace["pools"]
    assert {split: pool.num_pairs for split, pool in pools.items()} == {"train": 8000, "val": 1000, "test": 1000}
    assert pools["train"].num_user_types == 3
    assert "{'train': 8000, 'val': 1000, 'test': 1000}" in namespace["printed"]


def test_a_few_context_pairs_identify_each_of_the_three_users(namespace):
    accuracy = namespace["accuracy"]
    users = ("large", "small", "middle")
    # Without context one prediction serves all three: the users it does not fit are served badly.
    assert min(accuracy["0"][user]["mean"] for user in users) < 0.6
    # Five of a user's pairs identify them: every user is served well.
    assert all(accuracy["5"][user]["mean"] > 0.9 for user in users), accuracy["5"]
    assert accuracy["5"]["all"]["mean"] > accuracy["0"]["all"]["mean"] + 0.15


def test_the_adapted_reward_peaks_where_the_middle_user_wants(namespace):
    assert "this user's favourite option: 0.5" in namespace["printed"] or any(
        f"favourite option: {value}" in namespace["printed"] for value in ("0.4", "0.6"))


def test_a_bad_field_is_one_line_naming_it(namespace):
    assert "aggregation='max' is unknown; use one of ['mean', 'sum', 'attention']" in namespace["printed"]


def test_a_method_of_ones_own_trains_evaluates_and_checks_through_the_public_functions(namespace):
    accuracy = namespace["mine_accuracy"]
    # It learnt what the users have in common and how they differ: five context pairs help every user.
    assert accuracy["5"]["all"]["mean"] > accuracy["0"]["all"]["mean"] + 0.1, accuracy
    assert all(accuracy["5"][user]["mean"] > accuracy["0"][user]["mean"] for user in ("large", "small"))
    assert isinstance(namespace["mine"], namespace["PerUserPreferenceModel"])
    assert "least plausible answer: 3" in namespace["printed"]
