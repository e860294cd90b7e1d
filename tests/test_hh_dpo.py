"""The paper's UltraFeedback NP-DPO configuration, end to end on a tiny random Qwen2 and a fixture file
(through notebooks/hh_dpo.ipynb, whose offline stand-in is exactly that)."""

import json

import numpy as np
import pytest
from notebook_runner import execute_notebook
from tiny_lm import write_nps_model
from uf_fixture import write_random_jsonl

from nps.cli import main
from nps.data.prepared import load_preferences
from nps.lm.text import tokenise_chat
from nps.lm import from_pretrained

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


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
    """notebooks/hh_dpo.ipynb, executed top to bottom: on a CPU it runs NP-DPO, BTL-DPO on the mixture and
    the per-user oracles on its offline stand-in (a tiny random Qwen2, random UltraFeedback records)."""
    folder = tmp_path_factory.mktemp("notebook")
    outputs = execute_notebook("hh_dpo.ipynb", folder)
    assert not [o for o in outputs if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert sum(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs) == 1
    return folder, printed


def test_hh_dpo_runs_end_to_end_in_the_notebook_on_the_offline_stand_in(notebook_run):
    folder, printed = notebook_run
    assert "Offline stand-in (a CPU runtime; set USE_HUB = True to use the hub anyway)" in printed
    assert "80 of 80 prompts kept" in printed
    out = folder / "hh-dpo-run"
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "hh-dpo" and results["config"]["dtype"] == "float32"
    assert set(results["models"]) == {"np_dpo", "btl_dpo_mixed", "btl_dpo_helpfulness", "btl_dpo_honesty"}
    sizes = results["data"]["split_sizes"]
    assert sizes["train"] == int(0.8 * sum(sizes.values()))
    data = load_preferences(out / "dataset")
    assert results["data"]["content_hash"] == data.content_hash
    for name, model in results["models"].items():
        assert set(model["unseen_accuracy"]) == {"0", "1", "3"}
        assert np.isfinite(model["best_val_nll"])
        assert f"{name:14s} N^C=3: helpfulness" in printed
    assert results["base"]["weights_hash"] and (data.directory / "embeddings" / "tiny-qwen2-float32-len1024"
                                                 / "manifest.json").exists()


def test_prepare_and_a_missing_model_on_the_command_line(tmp_path, capsys):
    release = write_random_jsonl(tmp_path / "ultrafeedback.jsonl", num_prompts=80)
    assert main(["prepare", "hh", "--data", str(release), "--out", str(tmp_path / "datasets")]) == 0
    assert "80 of 80 prompts kept" in capsys.readouterr().out
    assert main(["reproduce", "hh-dpo", "--out", str(tmp_path / "run")]) == 2
    assert "needs --model" in capsys.readouterr().err
