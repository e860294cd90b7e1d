"""`nps collect` and profiles under faults: kills at several moments, a second writer, Ctrl-C,
a profile whose last line was cut, and input files that are not what they should be."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nps.cli import main
from nps.data.profiles import collect, read_pairs, read_profile
from nps.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
# The child restores Python's SIGINT handler (a test runner may start it with SIGINT ignored).
CHILD = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
        "from nps.cli import main; sys.exit(main(sys.argv[1:]))"


def write_candidates(path, count):
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "responses": [f"first {i}", f"second {i}"]}) + "\n"
                            for i in range(count)))
    return path


def write_choices(path, count, seed=0):
    rng = random.Random(seed)
    path.write_text("".join(rng.choice("12s") + "\n" for _ in range(count)))
    return path


def answers(profile):
    """A profile's records without their timestamps."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_profile(profile)]


def start_collect(*args, stdin=subprocess.DEVNULL):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", CHILD, "collect", *map(str, args)], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def line_count(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_scripted_collect_killed_at_several_moments_resumes_to_the_uninterrupted_profile(tmp_path, capsys):
    count = 1000
    candidates = write_candidates(tmp_path / "candidates.jsonl", count)
    choices = write_choices(tmp_path / "choices.txt", count)
    reference = tmp_path / "uninterrupted.jsonl"
    assert main(["collect", "--candidates", str(candidates), "--profile", str(reference),
                 "--choices", str(choices)]) == 0
    expected = answers(reference)
    assert len(expected) == count

    moments = {0: None, 100: None, 500: None, 900: None}  # kill once the profile holds this many answers
    profiles = {k: tmp_path / f"killed-at-{k}.jsonl" for k in moments}
    children = {k: start_collect("--candidates", candidates, "--profile", profiles[k], "--choices", choices)
                for k in moments}
    deadline = time.monotonic() + 60
    while any(child.returncode is None for child in children.values()) and time.monotonic() < deadline:
        for k, child in children.items():
            if child.returncode is None and line_count(profiles[k]) >= k:
                child.send_signal(signal.SIGKILL)
                child.wait(10)
                moments[k] = line_count(profiles[k])
        time.sleep(0.0005)
    assert all(child.returncode == -signal.SIGKILL for child in children.values())
    assert all(answered < count for answered in moments.values()), moments  # each was killed mid-session

    for k, profile in profiles.items():
        assert main(["collect", "--candidates", str(candidates), "--profile", str(profile),
                     "--choices", str(choices)]) == 0
        assert answers(profile) == expected, f"killed after {moments[k]} answers"


def test_scripted_answers_continue_after_a_limited_session(tmp_path):
    candidates = write_candidates(tmp_path / "candidates.jsonl", 6)
    scripted = ["first", "skip", "second", "second", "first", "skip"]
    collect(candidates, tmp_path / "whole.jsonl", scripted)
    collect(candidates, tmp_path / "parts.jsonl", scripted, limit=2)
    collect(candidates, tmp_path / "parts.jsonl", scripted, limit=3)
    collect(candidates, tmp_path / "parts.jsonl", scripted)
    assert answers(tmp_path / "parts.jsonl") == answers(tmp_path / "whole.jsonl")


def test_a_second_collect_is_refused_and_ctrl_c_keeps_the_answers(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "candidates.jsonl", 3)
    profile = tmp_path / "me.jsonl"
    child = start_collect("--candidates", candidates, "--profile", profile, stdin=subprocess.PIPE)
    try:
        child.stdin.write("1\n")
        child.stdin.flush()
        deadline = time.monotonic() + 30
        while line_count(profile) < 1 and time.monotonic() < deadline:  # the first answer is on disk
            time.sleep(0.01)
        assert line_count(profile) == 1

        assert main(["collect", "--candidates", str(candidates), "--profile", str(profile),
                     "--choices", str(write_choices(tmp_path / "choices.txt", 3))]) == 2
        err = capsys.readouterr().err
        assert err == f"nps: error: the profile {profile} is in use by another nps process (pid {child.pid}); " \
                      "wait for it to finish, or use another folder\n"
        assert line_count(profile) == 1  # the refused process wrote nothing

        child.send_signal(signal.SIGINT)  # Ctrl-C while the person looks at the second question
        _, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 130
    assert err.strip().splitlines() == [f"nps: interrupted: {profile} keeps 1 answers and 0 skips; run the same "
                                        "command again to continue where you stopped"]
    assert len(read_pairs(profile)) == 1


def test_a_profile_cut_mid_line_is_repaired_by_collect_and_named_by_readers(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "candidates.jsonl", 4)
    choices = write_choices(tmp_path / "choices.txt", 4, seed=1)
    whole = tmp_path / "whole.jsonl"
    assert main(["collect", "--candidates", str(candidates), "--profile", str(whole), "--choices", str(choices)]) == 0
    profile = tmp_path / "me.jsonl"
    lines = whole.read_text().splitlines(keepends=True)
    profile.write_text(lines[0] + lines[1] + lines[2][:25])  # killed while writing the third answer
    with pytest.raises(ConfigError, match=r"me.jsonl:3: not valid JSON .*the last line has no newline"):
        read_pairs(profile)
    with pytest.warns(UserWarning, match=r"me.jsonl: dropped an unfinished last line .* its candidate is asked again"):
        assert main(["collect", "--candidates", str(candidates), "--profile", str(profile),
                     "--choices", str(choices)]) == 0
    assert answers(profile) == answers(whole)

    # A whole last record without its newline (a hand edit) is kept and the next answer goes on a new line.
    profile.write_text(lines[0] + lines[1].rstrip("\n"))
    assert main(["collect", "--candidates", str(candidates), "--profile", str(profile), "--choices", str(choices)]) == 0
    assert answers(profile) == answers(whole)


def test_a_full_disk_during_collect_is_one_line_and_leaves_only_whole_answers(tmp_path):
    # Issue 23: two tracebacks, and the answer's cut line left in the profile. RLIMIT_FSIZE makes any write past
    # 1,500 bytes fail with EFBIG half-way through a line, as a full disk fails with ENOSPC.
    candidates = write_candidates(tmp_path / "candidates.jsonl", 30)
    choices = write_choices(tmp_path / "choices.txt", 30, seed=2)
    whole = tmp_path / "whole.jsonl"
    assert main(["collect", "--candidates", str(candidates), "--profile", str(whole), "--choices", str(choices)]) == 0
    profile = tmp_path / "me.jsonl"
    limited = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))\nfrom nps.cli import entry\nentry()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    full = subprocess.run([sys.executable, "-c", limited, "collect", "--candidates", str(candidates), "--profile",
                           str(profile), "--choices", str(choices)], capture_output=True, text=True, env=env,
                          timeout=120)
    kept = len(read_profile(profile))  # only whole lines: readers take it as it is
    assert full.returncode == 2 and 0 < kept < 30 and profile.stat().st_size <= 1500
    assert full.stderr == (f"nps: error: {profile}: the answer to candidate {kept} could not be saved (File too "
                           "large) and was not recorded; every earlier answer is kept: free disk space, then run the "
                           "same command again to continue\n")
    assert main(["collect", "--candidates", str(candidates), "--profile", str(profile), "--choices", str(choices)]) == 0
    assert answers(profile) == answers(whole)


def test_texts_with_unicode_line_separators_round_trip(tmp_path):
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(json.dumps({"prompt": "q\u2028", "responses": ["a\u2028b", "c\x85d"]}, ensure_ascii=False)
                          + "\n", encoding="utf-8")
    collect(candidates, tmp_path / "me.jsonl", ["first"], seed=0)
    (pair,) = read_pairs(tmp_path / "me.jsonl")
    assert pair["prompt"] == "q\u2028" and {pair["chosen"], pair["rejected"]} == {"a\u2028b", "c\x85d"}


BAD_FILES = {
    "not UTF-8": lambda path: path.write_bytes(b'{"prompt": "caf\xe9"}\n'),
    "binary": lambda path: path.write_bytes(bytes(range(256))),
    "a folder": lambda path: path.mkdir(),
}


@pytest.mark.parametrize("fault", BAD_FILES)
@pytest.mark.parametrize("role", ["candidates", "profile", "choices"])
def test_bad_input_files_to_collect_get_one_line_and_write_nothing(tmp_path, capsys, role, fault):
    paths = {"candidates": write_candidates(tmp_path / "candidates.jsonl", 2),
             "profile": tmp_path / "me.jsonl", "choices": write_choices(tmp_path / "choices.txt", 2)}
    paths[role] = tmp_path / f"bad-{role}"
    BAD_FILES[fault](paths[role])
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(["collect", "--candidates", str(paths["candidates"]), "--profile", str(paths["profile"]),
                 "--choices", str(paths["choices"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nps: error: {paths[role]}") and err.count("\n") == 1, err
    # No profile written, nothing changed (a lock file beside a bad profile is all that may appear).
    after = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir() if not p.name.endswith(".lock")}
    assert after == before


@pytest.mark.parametrize("fault", BAD_FILES)
@pytest.mark.parametrize("reader", ["context", "prompts"])
def test_bad_context_and_prompt_files_get_one_line(tmp_path, fault, reader):
    """`nps generate --context/--toward` and `nps ab --profile` read profiles; `nps ab --prompts` a text file."""
    from nps.data.two_styles import LanguageSpec, TwoStylesCodec
    from nps.workflow.ab import read_prompts

    path = tmp_path / "input"
    BAD_FILES[fault](path)
    with pytest.raises(ConfigError, match=f"^{path}") as error:
        read_pairs(path) if reader == "context" else read_prompts(path, TwoStylesCodec(LanguageSpec()))
    assert "\n" not in str(error.value)
