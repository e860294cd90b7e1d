"""The embedding cache: the paper's template, resume after an interruption, refusal of another model."""

import numpy as np
import pytest
from tiny_lm import write_nps_model

from nps.data.embedding_cache import cached_embeddings, option_text
from nps.errors import ConfigError
from nps.lm import embed, embed_tokens, from_pretrained


def test_template_has_real_newlines():
    assert option_text("Hi?", "Hello.") == "Human: Hi?\n\nAssistant: Hello."
    assert "\\n" not in option_text("a", "b")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm")
    write_nps_model(directory, "qwen2", seed=2)
    return from_pretrained(directory)


def test_resume_recomputes_only_missing_chunks(lm, tmp_path):
    texts = [option_text(f"question {i}", "the quick brown fox " * (i % 3 + 1)) for i in range(10)]
    sequences = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    calls = []

    def embed_fn(batch):
        calls.append(len(batch))
        return embed_tokens(lm.model, batch, batch_size=4)

    key = {"weights_hash": lm.weights_hash}
    common = dict(key=key, dim=lm.config.hidden_size, chunk_size=4)
    first = cached_embeddings(sequences, tmp_path, embed_fn, **common)
    assert first.shape == (10, lm.config.hidden_size) and calls == [4, 4, 2]
    np.testing.assert_allclose(first, embed(lm.model, lm.tokenizer, texts), atol=1e-5)

    (tmp_path / "chunk-00001.npy").unlink()  # as if killed while writing the second chunk
    calls.clear()
    again = cached_embeddings(sequences, tmp_path, embed_fn, **common)
    assert calls == [4]
    np.testing.assert_array_equal(again, first)

    with pytest.raises(ConfigError, match="weights_hash is .* belong to another model or other texts"):
        cached_embeddings(sequences, tmp_path, embed_fn, **(common | {"key": key | {"weights_hash": "other"}}))
    with pytest.raises(ConfigError, match="tokens_hash"):
        cached_embeddings(sequences[::-1], tmp_path, embed_fn, **common)


def test_a_loaded_embedder_in_another_dtype_than_the_caches_key_is_refused(lm, tmp_path):
    """The cache's folder and key carry ``dtype``: features of an fp32 model must not be filed as bf16."""
    from nps.data.embedding_cache import embed_options_cached

    with pytest.raises(ConfigError, match="the embedder was loaded in float32, not dtype=bfloat16"):
        embed_options_cached(lm, ["question"], ["answer"], tmp_path, dtype="bfloat16", echo=lambda _: None)
    assert not any(tmp_path.iterdir())  # nothing written
    features, record = embed_options_cached(lm, ["question"], ["answer"], tmp_path, dtype="float32",
                                            echo=lambda _: None)
    assert features.shape == (1, lm.config.hidden_size) and record["dim"] == lm.config.hidden_size
