"""Option features under faults and edge cases: a rerun with another maximum length, prompts longer
than the maximum, the tokenizer's BOS token, a second writer, damaged cache files."""

import json

import numpy as np
import pytest
from tiny_lm import write_nps_model

from nps.data.embedding_cache import embed_options_cached, option_text, option_tokens
from nps.errors import ConfigError
from nps.files import LockedError, exclusive_lock
from nps.lm import embed_tokens, from_pretrained

LONG_PROMPT = "Helpful answers explain; honest answers admit what they do not know. " * 4
PROMPTS = ["short question?", LONG_PROMPT, LONG_PROMPT, LONG_PROMPT]
RESPONSES = ["the fox", "the quick brown fox", "the lazy dog", "neural processes adapt"]


def quiet(_):
    pass


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    write_nps_model(directory, "qwen2", seed=3)
    return directory


def test_another_maximum_length_embeds_again_and_records_it(qwen, tmp_path):
    first, record = embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32", max_length=256,
                                         echo=quiet)
    assert record["embedded_now"] == 4 and record["prompts_cut"] == 0
    shorter, short_record = embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32",
                                                 max_length=48, echo=quiet)
    assert short_record["embedded_now"] == 4 and short_record["max_length"] == 48
    assert short_record["prompts_cut"] == 3 and short_record["cache"] != record["cache"]
    # The short option fits either way (up to float noise: its batch is padded to another width).
    np.testing.assert_allclose(shorter[0], first[0], atol=1e-5)
    assert not np.allclose(shorter[1:], first[1:])
    again, again_record = embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32",
                                               max_length=256, echo=quiet)
    assert again_record["embedded_now"] == 0
    np.testing.assert_array_equal(again, first)


def test_a_prompt_longer_than_the_maximum_keeps_each_response(qwen, tmp_path):
    lm = from_pretrained(qwen)
    tokens = option_tokens(lm.tokenizer, PROMPTS, RESPONSES, max_length=48)
    assert (tokens.prompts_cut, tokens.responses_cut) == (3, 0)
    for ids, prompt, response in zip(tokens.ids, PROMPTS, RESPONSES):
        whole = lm.tokenizer(option_text(prompt, response))["input_ids"]
        assert len(ids) == min(len(whole), 48)
        tail = lm.tokenizer("\n\nAssistant: " + response)["input_ids"]
        assert ids[-len(tail):] == whole[-len(tail):]  # the template's end and the whole response
        assert lm.tokenizer.decode(ids).startswith("Human:")
    features, _ = embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32", max_length=48,
                                       echo=quiet)
    distances = [np.linalg.norm(features[i] - features[j]) for i in (1, 2, 3) for j in (1, 2, 3) if i < j]
    assert min(distances) > 1e-3  # each completion of the long prompt has its own feature

    too_long = option_tokens(lm.tokenizer, ["q"], ["the quick brown fox jumps " * 20], max_length=48)
    assert (too_long.prompts_cut, too_long.responses_cut) == (0, 1) and len(too_long.ids[0]) == 48


def test_features_start_with_the_tokenizers_bos_as_the_released_code(tmp_path):
    write_nps_model(tmp_path / "llama", "llama", seed=1, bos=True)
    lm = from_pretrained(tmp_path / "llama")
    features, _ = embed_options_cached(str(tmp_path / "llama"), PROMPTS[:1], RESPONSES[:1], tmp_path / "cache",
                                            dtype="float32", echo=quiet)
    plain = lm.tokenizer(option_text(PROMPTS[0], RESPONSES[0]), add_special_tokens=False)["input_ids"]
    with_bos = embed_tokens(lm.model, [[lm.tokenizer.bos_token_id, *plain]])
    without = embed_tokens(lm.model, [plain])
    np.testing.assert_allclose(features, with_bos, atol=1e-5)
    assert not np.allclose(features, without, atol=1e-3)


def test_a_second_writer_is_refused_and_damaged_cache_files_are_handled(qwen, tmp_path):
    features, record = embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32", echo=quiet)
    cache = tmp_path / record["cache"]
    with exclusive_lock(cache):  # another run embedding into this cache
        with pytest.raises(LockedError, match=f"the embedding cache {cache} is in use by another nps process"):
            embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32", echo=quiet)

    chunk = cache / "chunk-00000.npy"
    chunk.write_bytes(chunk.read_bytes()[:100])  # a chunk cut short (a disk that filled up)
    again, again_record = embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32", echo=quiet)
    assert again_record["embedded_now"] == 4
    np.testing.assert_array_equal(again, features)
    assert sorted(p.name for p in cache.iterdir()) == [".nps.lock", "chunk-00000.npy", "manifest.json"]

    (cache / "manifest.json").write_text("{")
    with pytest.raises(ConfigError, match=r"manifest.json: not valid JSON .*delete this cache folder"):
        embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32", echo=quiet)
    (cache / "manifest.json").write_text(json.dumps(["not", "a", "manifest"]))
    with pytest.raises(ConfigError, match="manifest.json: weights_hash is None"):
        embed_options_cached(str(qwen), PROMPTS, RESPONSES, tmp_path, dtype="float32", echo=quiet)


def test_an_edited_architecture_beside_the_same_weights_is_refused(qwen, tmp_path):
    import shutil

    embed_options_cached(str(qwen), PROMPTS[:1], RESPONSES[:1], tmp_path / "cache", dtype="float32", echo=quiet)
    edited = tmp_path / qwen.name  # the same folder name, so the same cache folder
    shutil.copytree(qwen, edited)
    config = json.loads((edited / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] *= 2
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="manifest.json: architecture is .* belong to another model"):
        embed_options_cached(str(edited), PROMPTS[:1], RESPONSES[:1], tmp_path / "cache", dtype="float32",
                             echo=quiet)
