"""notebooks/synthetic.ipynb runs top to bottom (small settings) in a fresh kernel; its run is checked here.

(notebooks/steering.ipynb is executed once per machine by tests/steering_fixture.py; tests/test_steering.py
checks it, and its run serves the steering and app tests.)
"""

import json

import pytest
from notebook_runner import execute_notebook


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notebook")
    return folder / "synthetic-run", execute_notebook("synthetic.ipynb", folder)


def test_synthetic_notebook_executes(synthetic_run):
    _, outputs = synthetic_run
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "results.json" in printed


def test_small_synthetic_run_writes_results_and_plots(synthetic_run):
    out, _ = synthetic_run
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "synthetic" and results["config"]["train"]["steps"] == 200
    assert set(results["models"]) == {"btl", "dpl", "np_btl"}
    num_tasks = results["config"]["eval"]["num_tasks"]
    for model in results["models"].values():
        assert list(model["unseen_accuracy"]) == ["0", "1", "3", "5", "10"]
        for by_user in model["unseen_accuracy"].values():
            assert set(by_user) == {"z=0", "z=1", "all"}
            assert 0 <= by_user["all"]["mean"] <= 1 and by_user["all"]["sem"] > 0
            assert by_user["z=0"]["num_tasks"] + by_user["z=1"]["num_tasks"] == num_tasks
        assert model["wall_clock_seconds"] > 0
    # Context-free models cannot adapt; NP-BTL does even when small and briefly trained.
    btl = results["models"]["btl"]["unseen_accuracy"]
    assert btl["0"]["all"]["mean"] == pytest.approx(btl["10"]["all"]["mean"], abs=0.03)
    np_btl = results["models"]["np_btl"]["unseen_accuracy"]
    assert np_btl["10"]["all"]["mean"] > np_btl["0"]["all"]["mean"] + 0.05
    for plot in results["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
