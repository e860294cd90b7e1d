"""`nps compare` as a regression gate under faults: a B that diverged (NaN), crashed before a model or
metric was written, or whose results.json has the wrong shape."""

import json
import math

import pytest

from nps.cli import main


def results(accuracy=0.72, error=0.1, models=("np_btl", "btl_mixed")):
    def model():
        return {"unseen_accuracy": {"10": {"all": {"mean": accuracy, "sem": 0.005, "num_tasks": 1000}}},
                "z_inference_error": {"0.0": {"mean": error, "sem": 0.005, "num_tasks": 1000}}}
    return {"schema_version": 1, "experiment": "hh", "data": {"content_hash": "abc"},
            "models": {name: model() for name in models}}


def write(path, value):
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def compare(tmp_path, b, *flags):
    a = write(tmp_path / "a.json", results())
    return main(["compare", str(a), str(write(tmp_path / "b.json", b)), *flags])


def test_the_same_results_pass(tmp_path, capsys):
    assert compare(tmp_path, results()) == 0
    assert "0 regressions" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("metric", ["accuracy", "error"])
def test_a_non_finite_metric_in_b_fails_unless_allowed(tmp_path, capsys, bad, metric):
    b = results(**{metric: bad})
    assert compare(tmp_path, b) == 1
    out = capsys.readouterr().out
    assert "not finite in B (2, FAILS the comparison)" in out and "NOT FINITE" in out
    assert compare(tmp_path, b, "--allow-missing") == 0
    assert "not finite in B (2, allowed by --allow-missing)" in capsys.readouterr().out


def test_a_model_or_metric_missing_in_b_fails_unless_allowed(tmp_path, capsys):
    assert compare(tmp_path, results(models=("np_btl",))) == 1
    assert "only in A (2, FAILS the comparison): btl_mixed/unseen_accuracy/10/all" in capsys.readouterr().out
    partial = results()
    del partial["models"]["np_btl"]["z_inference_error"]
    assert compare(tmp_path, partial) == 1
    assert compare(tmp_path, partial, "--allow-missing") == 0
    # A metric only B has is listed, never a failure.
    extra = results()
    extra["models"]["np_btl"]["win_rate"] = {"mean": 0.5, "sem": 0.01}
    assert compare(tmp_path, extra) == 0
    assert "only in B (1): np_btl/win_rate" in capsys.readouterr().out


MALFORMED = {
    "models a list": ({**results(), "models": [1, 2]}, "'models' must map each model's name"),
    "a model a number": ({**results(), "models": {"np_btl": 3}}, "'models' must map each model's name"),
    "mean a string": (json.loads(json.dumps(results()).replace('"mean": 0.72', '"mean": "0.72"')),
                      "np_btl/unseen_accuracy/10/all: 'mean' is '0.72', not a number"),
    "mean null": (json.loads(json.dumps(results()).replace('"mean": 0.72', '"mean": null')),
                  "'mean' is None, not a number"),
    "sem true": (json.loads(json.dumps(results()).replace('"sem": 0.005', '"sem": true', 1)),
                 "'sem' is True, not a number"),
    "data a list": ({**results(), "data": ["abc"]}, "'data' must be an object"),
    # Issue 23: each of these passed with "0 regressions" (an accuracy that fell from 0.72 to 0.40 among them).
    "sem infinite": (json.loads(json.dumps(results(accuracy=0.40)).replace('"sem": 0.005', '"sem": Infinity', 1)),
                     "np_btl/unseen_accuracy/10/all: 'sem' is inf, but a standard error is finite and ≥ 0"),
    "sem negative": (json.loads(json.dumps(results(accuracy=0.40)).replace('"sem": 0.005', '"sem": -1.0', 1)),
                     "'sem' is -1.0, but a standard error is finite and ≥ 0"),
    "sem NaN for 1000 tasks": (json.loads(json.dumps(results(accuracy=0.40)).replace('"sem": 0.005', '"sem": NaN', 1)),
                               "'sem' is nan, but a standard error"),
    "accuracy 5.0": (results(accuracy=5.0), "np_btl/unseen_accuracy/10/all: 'mean' is 5.0, but a rate or accuracy "
                                            "lies in [0, 1]"),
    "error -0.1": (results(error=-0.1), "np_btl/z_inference_error/0.0: 'mean' is -0.1, but a rate or accuracy"),
    "num_tasks 0": (json.loads(json.dumps(results()).replace('"num_tasks": 1000', '"num_tasks": 0', 1)),
                    "'num_tasks' is 0, not a positive whole number"),
    "schema_version 99": ({**results(), "schema_version": 99}, "schema_version 99 is not one this nps reads (1)"),
    "no schema_version": ({k: v for k, v in results().items() if k != "schema_version"},
                          "schema_version None is not one this nps reads"),
    "not JSON": ('{"experiment": "hh", "models": {', "not valid JSON"),
    "not UTF-8": (b'{"experiment": "h\xe9"}'.decode("latin-1"), None),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_results_json_is_one_error_line(tmp_path, capsys, case):
    b, message = MALFORMED[case]
    path = tmp_path / "b.json"
    if case == "not UTF-8":
        path.write_bytes(b'{"experiment": "h\xe9"}')
        message = "not UTF-8 text"
    else:
        write(path, b)
    a = write(tmp_path / "a.json", results())
    assert main(["compare", str(a), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nps: error: {path}") and message in err and err.count("\n") == 1, err


def test_a_single_task_has_no_standard_error_and_a_reference_needs_finite_means(tmp_path, capsys):
    one_task = json.loads(json.dumps(results()).replace('"sem": 0.005, "num_tasks": 1000',
                                                        '"sem": NaN, "num_tasks": 1'))
    assert compare(tmp_path, one_task) == 0
    capsys.readouterr()
    a, b = write(tmp_path / "a.json", results(accuracy=math.nan)), write(tmp_path / "b.json", results())
    assert main(["compare", str(a), str(b)]) == 2
    assert capsys.readouterr().err == (f"nps: error: {a}: btl_mixed/unseen_accuracy/10/all: 'mean' is nan; A is the "
                                       "reference and needs finite metrics: compare against another run\n")


def test_bad_options_and_markdown_paths_are_one_line(tmp_path, capsys):
    assert compare(tmp_path, results(), "--tolerance", "nan") == 2
    assert capsys.readouterr().err == "nps: error: --tolerance nan must be a number ≥ 0\n"
    assert compare(tmp_path, results(), "--sigmas", "-1") == 2
    capsys.readouterr()
    (tmp_path / "report.md").mkdir()
    assert compare(tmp_path, results(), "--markdown", str(tmp_path / "report.md")) == 2
    assert capsys.readouterr().err.startswith(f"nps: error: {tmp_path / 'report.md'}: cannot be written")
