"""UltraFeedback input under faults: every malformed line or record is skipped and counted by reason
(or, with --strict, one error line), never an abort half-way or a traceback, and never a pair."""

import json

import pytest
from uf_fixture import completion, random_records

from nps.cli import main
from nps.data.prepared import load_preferences
from nps.data.ultrafeedback import read_ultrafeedback
from nps.errors import ConfigError


def good_completions(tag):
    """Three rated completions whose texts carry ``tag`` (so a pair made from them can be found)."""
    items = [completion(i, ratings) for i, ratings in enumerate([(5, 1, 3), (1, 5, 2), (3, 3, 4)])]
    for i, item in enumerate(items):
        item["response"] = f"{tag} response {i}"
    return items


def line(record):
    return json.dumps(record).encode() + b"\n"


# (reason counted, the line's bytes): each line would give pairs if it were (wrongly) read.
MALFORMED_LINES = [
    ("not_json", b'{"instruction": "BAD not json", "completions": [\n'),
    ("not_an_object", line([{"instruction": "BAD array", "completions": good_completions("BAD array")}])),
    ("no_instruction", line({"prompt": "BAD no instruction", "completions": good_completions("BAD no instruction")})),
    ("empty_instruction", line({"instruction": "  ", "completions": good_completions("BAD empty prompt")})),
    ("bad_completions", line({"instruction": "BAD completions", "completions": 5})),
    ("bad_completions", line({"instruction": "BAD completion", "completions": [5, *good_completions("BAD c")]})),
    ("bad_annotations", line({"instruction": "BAD annotations",
                              "completions": [*good_completions("BAD annotations"),
                                              {"response": "BAD r", "annotations": "bad"}]})),
    ("invalid_text", line({"instruction": "BAD surrogate \ud800", "completions": good_completions("BAD s")})),
    ("invalid_text", line({"instruction": "BAD surrogate in a response",
                           "completions": [*good_completions("BAD sr"), {**completion(3, (2, 2, 2)),
                                                                         "response": "BAD \udfff"}]})),
    ("not_utf8", b'{"instruction": "BAD latin-1 caf\xe9", "completions": []}\n'),
    # Issue 23: read as ratings (a pair decided by "1e9").
    ("rating_out_of_range", line({"instruction": "BAD rating 1e9",
                                  "completions": [*good_completions("BAD 1e9"), completion(3, ("1e9", 2, 2))]})),
    ("rating_out_of_range", line({"instruction": "BAD rating -3",
                                  "completions": [*good_completions("BAD -3"), completion(3, (4, -3, 2))]})),
    ("rating_out_of_range", line({"instruction": "BAD rating inf",
                                  "completions": [*good_completions("BAD inf"), completion(3, (4, "inf", 2))]})),
]


def write_release(path, cut_in_a_character=True):
    data = b"".join(line(r) for r in random_records(40, seed=5))
    for _, bad in MALFORMED_LINES:
        data += bad
    # A boolean rating is not the rating 1: that completion is unrated, the other two make the prompt's pair.
    true_rating = good_completions("ok true")[:2] + [completion(7, (4, 4, 4))]
    true_rating[2]["response"] = "BAD rated true"
    true_rating[2]["annotations"]["helpfulness"]["Rating"] = True
    data += line({"instruction": "rated true", "completions": true_rating})
    if cut_in_a_character:  # the download stopped inside "é" (two bytes in UTF-8)
        data += '{"instruction": "BAD cut caf\u00e9'.encode()[:-1]
    path.write_bytes(data)
    return path


def texts_of(data):
    return data.options.prompts + data.options.responses


def test_malformed_records_are_skipped_counted_and_never_paired(tmp_path, capsys):
    release = write_release(tmp_path / "train.jsonl")
    assert main(["prepare", "hh", "--data", str(release), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    expected = {}
    for reason, _ in MALFORMED_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    expected["not_utf8"] += 1  # the cut last line
    assert "14 malformed records skipped" in printed and "the first: train.jsonl:41: not JSON" in printed
    data = load_preferences(tmp_path / "out")
    report = data.metadata["read_report"]
    assert report["malformed"] == expected
    assert report["prompts_read"] == 40 + len(MALFORMED_LINES) + 2 and report["prompts_kept"] == 41
    assert report["completions_unrated"] == 1
    assert not [t for t in texts_of(data) if "BAD" in t]
    assert "rated true" in data.options.prompts  # its two well-rated answers still make a pair


def test_strict_makes_the_first_malformed_record_one_error_line_and_writes_nothing(tmp_path, capsys):
    release = write_release(tmp_path / "train.jsonl")
    assert main(["prepare", "hh", "--data", str(release), "--out", str(tmp_path / "out"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err == f"nps: error: {release}:41: not JSON; fix or delete this record, or prepare without --strict to " \
                  "skip and count such records\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reason, bad", MALFORMED_LINES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(MALFORMED_LINES)])
def test_each_malformed_record_alone(tmp_path, reason, bad):
    release = tmp_path / "train.jsonl"
    release.write_bytes(b"".join(line(r) for r in random_records(3, seed=1)) + bad)
    completions, report = read_ultrafeedback(release)
    assert report.malformed == {reason: 1} and report.prompts_kept == 3
    assert not [t for t in completions.prompts + completions.responses if "BAD" in t]
    with pytest.raises(ConfigError, match=r"train.jsonl:4: "):
        read_ultrafeedback(release, strict=True)


def test_files_that_are_not_a_release_get_one_line(tmp_path, capsys):
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    parquet = tmp_path / "train.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    messages = {folder: "is a folder", parquet: "not a readable parquet file", binary: "no prompt with two usable",
                empty: "no prompt with two usable"}
    for path, message in messages.items():
        assert main(["prepare", "hh", "--data", str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nps: error: {path}: {message}") and err.count("\n") == 1, err
    good = write_release(tmp_path / "good.jsonl", cut_in_a_character=False)
    (tmp_path / "a-file").write_text("")
    assert main(["prepare", "hh", "--data", str(good), "--out", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.startswith(f"nps: error: {tmp_path / 'a-file'}: is a file")
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_and_windows_line_ends_are_not_malformed(tmp_path):
    release = tmp_path / "train.jsonl"
    release.write_bytes(b"\xef\xbb\xbf" + b"".join(line(r)[:-1] + b"\r\n" for r in random_records(3, seed=1)))
    _, report = read_ultrafeedback(release)
    assert report.prompts_kept == 3 and report.malformed == {}
