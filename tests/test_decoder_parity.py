"""The decoder family against transformers' PyTorch models on tiny random weights (fp32).

Needs the parity extra (torch); without it this file alone is skipped.
"""

from __future__ import annotations

import importlib.util

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_lm import FAMILIES, padded_batch, write_torch_model

from nps.lm import LoRAConfig, SamplingConfig, embed, from_pretrained, generate
from nps.lm.loading import save_pretrained
from nps.lm.lora import merge_lora

# Looked up, not imported: both workers collect this file, and only the one that runs it pays torch's import.
if importlib.util.find_spec("torch") is None:
    pytest.skip("parity tests need the parity extra (torch==2.13.0)", allow_module_level=True)
# Measured deltas are 2-4e-7 on logits and ≤ 1.3e-6 on hidden states.
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def family_pair(request, tmp_path_factory):
    """(family, transformers model, nps Pretrained) over the same random weights."""
    directory = tmp_path_factory.mktemp(request.param)
    reference = write_torch_model(directory, request.param)
    return request.param, reference, from_pretrained(directory)


def torch_forward(model, tokens, mask):
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # HF's generate convention for padded rows
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
            output_hidden_states=True,
        )
    return out.logits.numpy(), out.hidden_states[-1].numpy()


def test_logits_match_transformers_on_padded_batch(family_pair):
    family, reference, pretrained = family_pair
    tokens, mask = padded_batch()
    ref_logits, ref_hidden = torch_forward(reference, tokens, mask)
    hidden, _ = pretrained.model.hidden_states(jnp.asarray(tokens), jnp.asarray(mask))
    logits = pretrained.model.logits(hidden)
    chex.assert_shape(logits, (*tokens.shape, 320))
    assert np.abs(np.asarray(logits) - ref_logits)[mask].max() <= TOLERANCE, family
    assert np.abs(np.asarray(hidden) - ref_hidden)[mask].max() <= TOLERANCE, family


def test_embedding_is_transformers_last_token_state(family_pair):
    import torch

    family, reference, pretrained = family_pair
    texts = ["Human: hello\n\nAssistant: hi there", "a", "The quick brown fox jumps over the lazy dog."]
    ours = embed(pretrained.model, pretrained.tokenizer, texts, batch_size=2)
    for text, vector in zip(texts, ours):
        ids = pretrained.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = reference.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        assert np.abs(vector - expected).max() <= TOLERANCE, family


def test_greedy_generation_matches_transformers(family_pair):
    import torch

    family, reference, pretrained = family_pair
    tokens, mask = padded_batch(seed=1, length=8)
    mask[2, 5:] = True  # generation prompts: left padding only
    with torch.no_grad():
        expected = reference.generate(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
            max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
        ).numpy()[:, tokens.shape[1] :]
    out = generate(pretrained.model, tokens, mask, sampling=SamplingConfig(max_new_tokens=16))
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    np.testing.assert_array_equal(np.asarray(out.lengths), 16)


def test_merged_export_loads_in_transformers(tmp_path):
    import transformers

    write_torch_model(tmp_path / "base", "qwen2", seed=3, tokenizer=False)
    tokens, mask = padded_batch()
    lora = LoRAConfig(rank=4, targets=("q", "v", "gate"))
    pretrained = from_pretrained(tmp_path / "base", tokenizer=False, lora=lora)
    model = pretrained.model
    for index, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))):  # as if trained
        var[...] = var[...] + 0.05 * np.random.default_rng(index).normal(size=var[...].shape)
    adapted = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    merge_lora(model)
    save_pretrained(model, tmp_path / "merged", pretrained.hf_config)
    exported = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    logits, _ = torch_forward(exported, tokens, mask)
    assert np.abs(logits - adapted)[mask].max() <= TOLERANCE
