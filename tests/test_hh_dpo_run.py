"""What follows training on a real chat model: an hh-dpo run of the tiny offline Qwen2 (the session's `hh_dpo_run`)
through `nps generate`, `nps serve` in a browser, `nps ab`, `nps profile check` and `nps collect --active`.

The model is random, so its replies are noise; what is checked is the path: prompts templated as training
tokenised them, replies that stop at the end of the turn, users' contexts read by the recorded embedder, one
line for what cannot work, and every command accepting the run.
"""

from __future__ import annotations

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from app_server import CHROMEDRIVER, CHROMIUM, Server, headless_chromium

from nps.cli import main
from nps.data.profiles import read_profile
from nps.lm import SamplingConfig, from_pretrained, generate_text
from nps.lm.text import tokenise_chat
from nps.steering_run import SteeringRun

CONTEXT = [
    {"prompt": "What is a fox?", "chosen": "A fox is a small wild dog with a bushy tail.", "rejected": "No idea."},
    {"prompt": "Why is the sky blue?", "chosen": "Air scatters blue light more than red light.",
     "rejected": "It just is, I am sure."},
]
CANDIDATES = [
    {"prompt": "How do I boil an egg?", "responses": ["Simmer it for nine minutes, then cool it in cold water.",
                                                      "Boil it. Maybe. I am not certain how long."]},
    {"prompt": "Is the moon made of cheese?", "responses": ["No: it is rock, as the Apollo samples showed.",
                                                            "Some say so; I cannot rule it out."]},
    {"prompt": "Name a prime number.", "responses": ["Seven.", "I believe 9 is prime, though I may be wrong."]},
    {"prompt": "What is the capital of France?", "responses": ["Paris.", "Possibly Lyon; please verify."]},
    {"prompt": "Explain photosynthesis briefly.", "responses": [
        "Plants turn light, water and carbon dioxide into sugar and oxygen.", "Plants eat sunlight, I think."]},
    {"prompt": "How many legs has a spider?", "responses": ["Eight.", "Six, unless I misremember."]},
]


def alphanumeric(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def run(hh_dpo_run):
    return SteeringRun.load(hh_dpo_run)


@pytest.fixture(scope="module")
def scored_run(hh_dpo_run, tmp_path_factory):
    """A copy of the run for `nps ab --scorer np_btl`, which trains its scorer into the run once (then reuses it)."""
    copy = tmp_path_factory.mktemp("scored") / "run"
    shutil.copytree(hh_dpo_run, copy)
    return copy


def test_prompts_are_templated_as_training_tokenised_them_and_replies_stop_at_the_end_of_turn(run, hh_dpo_run):
    config = json.loads((hh_dpo_run / "results.json").read_text())["config"]
    pretrained = from_pretrained(config["model"])
    prompts, responses = [c["prompt"] for c in CANDIDATES], [c["responses"][0] for c in CANDIDATES]
    tokens, token_mask, response_mask, _ = tokenise_chat(pretrained.tokenizer, prompts, responses, 512)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids, start = run.codec.option_ids(prompt, response)
        assert ids == tokens[row][token_mask[row]].tolist()
        assert start == int(np.argmax(response_mask[row])) and ids[:start] == run.codec.prompt_ids(prompt)
    assert pretrained.tokenizer.convert_tokens_to_ids("<|im_end|>") in run.codec.stop_tokens
    # The base's greedy replies are transformers-style chat generation's (nps.lm.generate_text), stop for stop.
    greedy = SamplingConfig(max_new_tokens=run.codec.max_new_tokens, temperature=0.0)
    expected = generate_text(pretrained.model, pretrained.tokenizer, prompts[:3], sampling=greedy)
    assert run.generate(prompts[:3], base=True, temperature=0.0) == [text.strip() for text in expected]


def test_generate_steers_by_the_z_of_a_context_read_by_the_recorded_embedder(run, tmp_path, capsys, hh_dpo_run):
    context = write_jsonl(tmp_path / "me.jsonl", CONTEXT)
    assert main(["generate", "--run", str(hh_dpo_run), "--prompt", "Tell me about foxes.", "--context", str(context),
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    z = run.encode_user(CONTEXT)
    assert printed == [f"# user of {context}",
                       "Tell me about foxes. => " + run.generate(["Tell me about foxes."], z, temperature=0.0)[0]]
    assert not np.allclose(z, run.encode_user([]))  # the encoder reads the context's features
    # The context's features are the recorded embedder's, as training computed them for its options.
    from nps.data.embedding_cache import option_tokens
    from nps.lm import embed_tokens

    pretrained = from_pretrained(json.loads((hh_dpo_run / "results.json").read_text())["config"]["model"])
    ids = option_tokens(pretrained.tokenizer, [CONTEXT[0]["prompt"]], [CONTEXT[0]["chosen"]], 1024).ids
    chosen, _, mask = run.pair_features(CONTEXT)
    np.testing.assert_allclose(np.asarray(chosen[0, 0]), embed_tokens(pretrained.model, ids)[0], rtol=1e-5)
    assert mask.tolist() == [[True, True] + [False] * 6]


def test_what_cannot_match_the_run_is_one_line(run, hh_dpo_run, tmp_path, capsys):
    long = write_jsonl(tmp_path / "long.jsonl", [CONTEXT[0] | {"chosen": "fox " * 600}])
    assert main(["generate", "--run", str(hh_dpo_run), "--prompt", "hi", "--context", str(long)]) == 2
    error = capsys.readouterr().err.strip()
    assert "more than this model's 512 positions; shorten it" in error and "\n" not in error
    copy = tmp_path / "run"
    shutil.copytree(hh_dpo_run, copy)
    results = json.loads((copy / "results.json").read_text())
    results["embedder"]["max_length"] = 256
    (copy / "results.json").write_text(json.dumps(results))
    assert main(["generate", "--run", str(copy), "--prompt", "hi"]) == 2
    error = capsys.readouterr().err.strip()
    assert "results.json: embedder.max_length is 256, but the embedder at" in error and "\n" not in error
    assert main(["ab", "--run", str(hh_dpo_run), "--profile", f"detail={tmp_path}/x.jsonl", "--prompts", "p"]) == 2
    assert "USER_TYPE one of ['helpfulness', 'honesty']" in capsys.readouterr().err


def test_ab_profile_check_and_active_questions_on_the_hh_dpo_run(run, hh_dpo_run, scored_run, tmp_path, capsys):
    profile = write_jsonl(tmp_path / "me.jsonl", CONTEXT * 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about foxes.\nWhat is rain?\n")
    ab = ["ab", "--run", str(scored_run), "--profile", f"helpfulness={profile}", "--prompts", str(prompts),
          "--samples", "2", "--out", str(tmp_path / "ab")]
    assert main(ab) == 2
    assert ("a hh-dpo run has no true reward per user type; score with a reward model conditioned on the profile: "
            "--scorer np_btl | vpl | pal-a | pal-b | lore") in capsys.readouterr().err
    assert main(ab + ["--scorer", "np_btl", "--scorer-steps", "10"]) == 0
    report = json.loads((tmp_path / "ab" / "ab.json").read_text())
    rate = report["by_user_type"]["helpfulness"]["win_rate"]
    assert 0.0 <= rate["mean"] <= 1.0 and rate["num_tasks"] == 4
    assert report["by_profile"][0]["context_pairs"] == 4

    assert main(["profile", "check", str(profile), "--run", str(hh_dpo_run), "--json", str(tmp_path / "c.json")]) == 0
    checked = json.loads((tmp_path / "c.json").read_text())
    assert checked["run_fingerprint"] == run.fingerprint and len(checked["leave_one_out"]) == 4
    assert "answered both ways" not in capsys.readouterr().out

    candidates = write_jsonl(tmp_path / "candidates.jsonl", CANDIDATES)
    choices = tmp_path / "choices.txt"
    choices.write_text("1\n2\n1\n")
    first = run.informative_order(candidates)(CANDIDATES, [], set())
    assert main(["collect", "--candidates", str(candidates), "--profile", str(tmp_path / "asked.jsonl"), "--choices",
                 str(choices), "--active", str(hh_dpo_run)]) == 0
    asked = read_profile(tmp_path / "asked.jsonl")
    assert len(asked) == 3 and asked[0]["candidate"] == first


def test_concurrent_requests_share_a_batch_and_each_reply_is_the_one_its_seed_gives_alone(run):
    from nps.serve.batching import GenerationBatcher, GenerationRequest
    from nps.serve.store import StoreError

    z = np.asarray(run.encode_user(CONTEXT))
    requests = [GenerationRequest(c["prompt"], z * (i + 1) / 3, 7 + i) for i, c in enumerate(CANDIDATES[:3])]
    requests.append(GenerationRequest(CANDIDATES[3]["prompt"], None, 11, base=True))
    batcher = GenerationBatcher(run, max_wait=0.5)
    replies = batcher.generate(requests)
    assert batcher.batches == [4]  # one visit: three steered rows in one call, the base arm in another
    alone = [run.generate([r.prompt], jnp.asarray(r.z), seed=r.seed)[0] for r in requests[:3]]
    assert replies == alone + run.generate([requests[3].prompt], seed=11, base=True)
    full = GenerationBatcher(run, queue_limit=2)
    with pytest.raises(StoreError, match="the model is busy") as refused:
        full.generate(requests[:3])
    assert refused.value.status == 503 and full.batches == []


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="headless Chromium is not installed: apt-get install chromium chromium-driver "
                           "(.ci/run installs them)")
def test_a_person_teaches_tries_and_checks_an_hh_dpo_policy_in_a_browser_then_ab_and_profile_check(
        hh_dpo_run, scored_run, tmp_path, capsys):
    pytest.importorskip("selenium", reason="pip install -e '.[test]' installs selenium")
    from selenium.webdriver.common.by import By

    candidates = write_jsonl(tmp_path / "candidates.jsonl", CANDIDATES)
    server = Server(hh_dpo_run, tmp_path / "store", tmp_path / "server.log", candidates=candidates).start()
    browser = headless_chromium(tmp_path / "chromium")
    base = f"http://127.0.0.1:{server.port}"
    try:
        browser.get(base + "/")
        browser.find_element(By.ID, "name").send_keys("Grace")
        browser.find_element(By.ID, "start").click()
        # Wait for the page the sign-up answers with (it sets the session cookie): navigating away before it
        # arrives cancels the sign-up, and /teach then shows the start page.
        assert "/p/grace/" in browser.find_element(By.ID, "personal-link").text
        shown = []
        for _ in range(3):  # Teach: the most informative pairs, as free text
            browser.get(base + "/teach")
            shown.append((browser.find_element(By.ID, "left").text, browser.find_element(By.ID, "right").text))
            browser.find_element(By.ID, "choose-left").click()
            assert "Saved" in browser.find_element(By.ID, "saved").text

        browser.get(base + "/try")  # Try: any prompt; a steered reply, then one blind A/B against the base
        browser.find_element(By.ID, "prompt").send_keys("How should I store fresh herbs?")
        browser.find_element(By.ID, "steer").click()
        assert browser.find_element(By.ID, "steered") is not None
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Write one sentence about rain.")
        browser.find_element(By.ID, "ab").click()
        first = browser.find_element(By.ID, "first").text
        browser.find_element(By.ID, "prefer-first").click()
        assert "Recorded" in browser.find_element(By.ID, "judged").text

        browser.get(base + "/profile")  # Profile: counts, checks, the map of z
        assert browser.find_element(By.ID, "answer-count").text == "3"
        assert browser.find_element(By.ID, "consistency").text
        assert browser.execute_script("return document.getElementById('z-plot').naturalWidth") > 100
    finally:
        browser.quit()
        server.stop()

    person = tmp_path / "store" / "people" / "grace"
    records = read_profile(person / "profile.jsonl")
    assert [(r["chosen"], r["rejected"]) for r in records] == shown
    judgement, = [json.loads(line) for line in (person / "ab.jsonl").read_text().splitlines()]
    assert judgement["prompt"] == "Write one sentence about rain." and judgement["baseline_name"] == "base"
    assert judgement["verdict"] == "first" and judgement["preferred"] == judgement["shown_first"]
    # The random model's replies are arbitrary bytes (control characters a browser shows its own way): their
    # letters and digits are compared.
    assert alphanumeric(judgement[judgement["shown_first"]]) == alphanumeric(first)

    # The profile the app wrote, used by the command-line tools.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Write one sentence about rain.\n")
    assert main(["ab", "--run", str(scored_run), "--profile", f"honesty={person / 'profile.jsonl'}", "--prompts",
                 str(prompts), "--samples", "2", "--scorer", "np_btl", "--scorer-steps", "10", "--out",
                 str(tmp_path / "ab")]) == 0
    assert main(["profile", "check", str(person / "profile.jsonl"), "--run", str(hh_dpo_run)]) == 0
    assert "3 answers" in capsys.readouterr().out
