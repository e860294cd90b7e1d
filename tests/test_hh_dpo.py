"""The paper's UltraFeedback NP-DPO configuration, end to end on a tiny random Qwen2 and a fixture file."""

import json

import numpy as np
import pytest
from tiny_lm import write_nps_model
from uf_fixture import write_random_jsonl

from nps.cli import main
from nps.data.prepared import load_preferences
from nps.lm.text import tokenise_chat
from nps.lm import from_pretrained

SMALL = [
    "dtype=float32", "max_length=48", "policy.encoder.hidden_dim=16", "policy.encoder.latent_dim=8",
    "policy.lora.rank=2", "policy.lora.alpha=4", "episodes.num_targets=4", "episodes.max_context=2",
    "eval_num_targets=5", "eval.context_sizes=0,1,3", "eval.num_tasks=8", "train.steps=4", "train.eval_every=2",
    "train.checkpoint_every=2", "train.val_tasks=4", "train.batch_size=2", "reference_batch_size=64",
    "models=np_dpo,btl_dpo_oracles",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    write_nps_model(directory, "qwen2", seed=4)
    return directory


def test_targets_start_after_the_templated_prompt_and_a_long_prompt_is_cut_from_the_left(model_dir):
    tokenizer = from_pretrained(model_dir).tokenizer
    long_prompt = "why " * 60 + "is the sky blue?"
    tokens, token_mask, response_mask, cut = tokenise_chat(
        tokenizer, ["what is a fox?", long_prompt, "hi"], ["a fox is a dog", "because of light", "hello " * 40],
        max_length=40)
    head = tokenizer.apply_chat_template([{"role": "user", "content": "what is a fox?"}], add_generation_prompt=True,
                                         tokenize=False)
    assert tokenizer.decode(tokens[0][token_mask[0] & ~response_mask[0]]) == head
    assert tokenizer.decode(tokens[0][response_mask[0]]).startswith("a fox is a dog<|im_end|>")
    # A prompt too long for the sequence loses its start, never the response DPO scores.
    assert token_mask[1].all() and tokenizer.decode(tokens[1][response_mask[1]]).startswith("because of light")
    assert tokenizer.decode(tokens[1][~response_mask[1]]).endswith("sky blue?<|im_end|>\n<|im_start|>assistant\n")
    # A response longer than the sequence keeps a quarter for the prompt and is cut from the right.
    assert token_mask[2].all() and (~response_mask[2]).sum() == 10
    assert cut == {"prompts_cut": 2, "responses_cut": 1}


def test_hh_dpo_runs_end_to_end_from_local_paths(model_dir, tmp_path, capsys):
    # The prepared dataset (the raw file's path is exercised by tests/test_uf_rewards.py).
    release = write_random_jsonl(tmp_path / "ultrafeedback.jsonl", num_prompts=80)
    assert main(["prepare", "hh", "--data", str(release), "--out", str(tmp_path / "datasets")]) == 0
    assert "80 of 80 prompts kept" in capsys.readouterr().out
    data = load_preferences(tmp_path / "datasets")
    out = tmp_path / "run"
    args = ["reproduce", "hh-dpo", "--model", str(model_dir), "--data", str(data.directory), "--out", str(out),
            "--quiet"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "hh-dpo"
    assert set(results["models"]) == {"np_dpo", "btl_dpo_helpfulness", "btl_dpo_honesty"}
    sizes = results["data"]["split_sizes"]
    assert sizes["train"] == int(0.8 * sum(sizes.values()))
    assert results["data"]["content_hash"] == data.content_hash
    for model in results["models"].values():
        assert set(model["unseen_accuracy"]) == {"0", "1", "3"}
        assert np.isfinite(model["best_val_nll"])
    assert results["base"]["weights_hash"] and (data.directory / "embeddings" / f"{model_dir.name}-float32-len1024"
                                                 / "manifest.json").exists()
    assert main(["reproduce", "hh-dpo", "--out", str(out)]) == 2
    assert "needs --model" in capsys.readouterr().err
