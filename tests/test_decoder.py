"""The decoder family against transformers' PyTorch models, and its LoRA/FiLM/generation behaviour."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_lm import FAMILIES, padded_batch, write_nps_model, write_torch_model

from nps.layers import BaseParam
from nps.models import ConditionedDecoder

from nps.lm import LoRAConfig, SamplingConfig, embed, from_pretrained, generate, generate_text
from nps.lm.decoder import DecoderConfig, rope_frequencies
from nps.lm.loading import save_pretrained
from nps.lm.lora import load_adapters, merge_lora, save_adapters

torch = pytest.importorskip("torch", reason="parity tests need the parity extra (torch==2.13.0)")
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family_pair(request, tmp_path_factory):
    """(family, transformers model, nps Pretrained) over the same random weights."""
    directory = tmp_path_factory.mktemp(request.param)
    reference = write_torch_model(directory, request.param)
    return request.param, reference, from_pretrained(directory)


def torch_forward(model, tokens, mask):
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


def test_padding_does_not_change_real_tokens(family_pair):
    _, _, pretrained = family_pair
    tokens, mask = padded_batch()
    model = pretrained.model
    full = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))
    row = 1  # left-padded row run alone, unpadded
    alone = np.asarray(model(jnp.asarray(tokens[row : row + 1, mask[row]])))
    np.testing.assert_allclose(full[row, mask[row]], alone[0], atol=1e-5)


def test_embedding_is_transformers_last_token_state(family_pair):
    family, reference, pretrained = family_pair
    texts = ["Human: hello\n\nAssistant: hi there", "a", "The quick brown fox jumps over the lazy dog."]
    ours = embed(pretrained.model, pretrained.tokenizer, texts, batch_size=2)
    for text, vector in zip(texts, ours):
        ids = pretrained.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = reference.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].numpy()
        assert np.abs(vector - expected).max() <= TOLERANCE, family


def test_greedy_generation_matches_transformers(family_pair):
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


def test_llama3_rope_scaling_is_applied():
    scaled = DecoderConfig(model_type="llama", head_dim=16, rope_theta=5e5, rope_type="llama3", rope_factor=8.0,
                           rope_original_max_positions=64)
    plain = DecoderConfig(model_type="llama", head_dim=16, rope_theta=5e5)
    high, low = rope_frequencies(scaled), rope_frequencies(plain)
    assert high[0] == low[0]  # the highest frequency is untouched
    np.testing.assert_allclose(high[-1], low[-1] / 8.0, rtol=1e-6)  # the lowest is divided by the factor


def test_bf16_weights_track_fp32(tmp_path):
    write_nps_model(tmp_path, "qwen2", tokenizer=False)
    fp32 = from_pretrained(tmp_path, tokenizer=False).model
    bf16 = from_pretrained(tmp_path, dtype=jnp.bfloat16, tokenizer=False).model
    assert all(v[...].dtype == jnp.bfloat16 for _, v in nnx.to_flat_state(nnx.state(bf16, BaseParam)))
    tokens, mask = padded_batch()
    a, b = fp32(jnp.asarray(tokens), jnp.asarray(mask)), bf16(jnp.asarray(tokens), jnp.asarray(mask))
    assert b.dtype == jnp.float32  # logits accumulate in fp32
    assert np.abs(np.asarray(a) - np.asarray(b))[mask].max() < 0.05


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    write_torch_model(directory, "qwen2", seed=3)
    return directory


def perturb(variables, seed=0, scale=0.05):
    """Give trainable variables (LoRA B, FiLM) non-identity values, as training would."""
    for index, (_, var) in enumerate(nnx.to_flat_state(variables)):
        var[...] = var[...] + scale * jax.random.normal(jax.random.key(seed + index), var[...].shape)


def test_lora_starts_as_base_and_reference_is_the_base(qwen):
    tokens, mask = (jnp.asarray(x) for x in padded_batch())
    base = from_pretrained(qwen, tokenizer=False).model
    adapted = from_pretrained(qwen, tokenizer=False, lora=LoRAConfig(rank=4, targets=("q", "v", "down"))).model
    expected = base(tokens, mask)
    np.testing.assert_array_equal(adapted(tokens, mask), expected)  # B = 0: exactly the base
    perturb(nnx.state(adapted, nnx.LoRAParam))
    assert np.abs(np.asarray(adapted(tokens, mask) - expected)).max() > 1e-2
    np.testing.assert_array_equal(adapted(tokens, mask, use_lora=False), expected)  # the DPO reference


def test_trainable_split_is_by_type(qwen):
    model = from_pretrained(qwen, tokenizer=False, lora=LoRAConfig(rank=2)).model
    conditioned = ConditionedDecoder(model, latent_dim=8)
    _, frozen, trainable = nnx.split(conditioned, BaseParam, nnx.Param)
    trainable_names = {str(p[-1]) for p, _ in nnx.to_flat_state(trainable)}
    assert trainable_names == {"q_a", "q_b", "v_a", "v_b", "gamma_kernel", "gamma_bias", "beta_kernel", "beta_bias"}
    frozen_names = {str(p[-1]) for p, _ in nnx.to_flat_state(frozen)}
    assert {"q", "v", "embed", "lm_head"} <= frozen_names and not frozen_names & trainable_names


def test_lora_dropout_only_with_a_key(qwen):
    model = from_pretrained(qwen, tokenizer=False, lora=LoRAConfig(rank=4, dropout=0.5)).model
    perturb(nnx.state(model, nnx.LoRAParam))
    tokens = jnp.asarray(padded_batch()[0])
    np.testing.assert_array_equal(model(tokens), model(tokens))
    dropped = model(tokens, dropout_key=jax.random.key(0))
    assert np.abs(np.asarray(dropped - model(tokens))).max() > 1e-3
    np.testing.assert_array_equal(dropped, model(tokens, dropout_key=jax.random.key(0)))


def test_merge_export_and_adapter_round_trip(qwen, tmp_path):
    import transformers

    tokens, mask = padded_batch()
    pretrained = from_pretrained(qwen, tokenizer=False, lora=LoRAConfig(rank=4, targets=("q", "v", "gate")))
    model = pretrained.model
    perturb(nnx.state(model, nnx.LoRAParam))
    adapted = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))

    save_adapters(model, tmp_path / "adapters", base_identity=pretrained.identity,
                  base_weights_hash=pretrained.weights_hash)
    fresh = from_pretrained(qwen, tokenizer=False)
    load_adapters(fresh.model, tmp_path / "adapters", base_weights_hash=fresh.weights_hash)
    np.testing.assert_array_equal(fresh.model(jnp.asarray(tokens), jnp.asarray(mask)), adapted)

    merge_lora(model)
    assert model.lora is None
    np.testing.assert_allclose(model(jnp.asarray(tokens), jnp.asarray(mask)), adapted, atol=1e-5)
    save_pretrained(model, tmp_path / "merged", pretrained.hf_config)
    exported = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    logits, _ = torch_forward(exported, tokens, mask)
    assert np.abs(logits - adapted)[mask].max() <= TOLERANCE


def test_adapters_refuse_another_base(qwen, tmp_path):
    from nps.lm.loading import CheckpointFormatError

    pretrained = from_pretrained(qwen, tokenizer=False, lora=LoRAConfig(rank=2))
    save_adapters(pretrained.model, tmp_path / "a", base_identity="qwen", base_weights_hash=pretrained.weights_hash)
    other_dir = tmp_path / "other"
    write_nps_model(other_dir, "qwen2", seed=9, tokenizer=False)
    other = from_pretrained(other_dir, tokenizer=False)
    assert other.weights_hash != pretrained.weights_hash
    with pytest.raises(CheckpointFormatError, match="trained on base 'qwen'"):
        load_adapters(other.model, tmp_path / "a", base_weights_hash=other.weights_hash)


def test_film_identity_at_init_and_per_example_z(qwen):
    tokens, mask = (jnp.asarray(x) for x in padded_batch())
    base = from_pretrained(qwen, tokenizer=False).model
    conditioned = ConditionedDecoder(from_pretrained(qwen, tokenizer=False).model, latent_dim=8)
    z = jax.random.normal(jax.random.key(0), (tokens.shape[0], 8))
    expected = base(tokens, mask)
    np.testing.assert_array_equal(conditioned(tokens, mask, z=z), expected)
    perturb(nnx.state(conditioned.film))
    np.testing.assert_array_equal(conditioned(tokens, mask), expected)  # z = None: the base model
    steered = np.asarray(conditioned(tokens, mask, z=z))
    assert np.abs(steered - np.asarray(expected)).max() > 1e-2
    for row in range(tokens.shape[0]):  # each example sees only its own z
        alone = conditioned(tokens[row : row + 1], mask[row : row + 1], z=z[row : row + 1])
        np.testing.assert_allclose(steered[row], alone[0], atol=1e-5)


def test_conditioned_generation_uses_each_examples_z(qwen):
    conditioned = ConditionedDecoder(from_pretrained(qwen, tokenizer=False).model, latent_dim=4)
    perturb(nnx.state(conditioned.film), scale=2.0)
    tokens, mask = padded_batch(seed=2, batch=2, length=6)
    mask[:] = True
    z = jnp.stack([jnp.full(4, -1.0), jnp.full(4, 1.0)])
    sampling = SamplingConfig(max_new_tokens=12)
    batched = np.asarray(generate(conditioned, tokens, mask, sampling=sampling, z=z).tokens)
    for row in range(2):
        alone = generate(conditioned, tokens[row : row + 1], sampling=sampling, z=z[row : row + 1])
        np.testing.assert_array_equal(batched[row], np.asarray(alone.tokens)[0])
    base = np.asarray(generate(conditioned, tokens, mask, sampling=sampling).tokens)
    assert (batched != base).any()


def test_sampling_controls(qwen):
    model = from_pretrained(qwen, tokenizer=False).model
    tokens = padded_batch(seed=4, batch=3, length=5)[0]
    greedy = np.asarray(generate(model, tokens, sampling=SamplingConfig(max_new_tokens=10)).tokens)
    top1 = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(np.asarray(generate(model, tokens, sampling=top1, seed=5).tokens), greedy)
    tiny_p = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(generate(model, tokens, sampling=tiny_p, seed=5).tokens), greedy)
    hot = SamplingConfig(max_new_tokens=10, temperature=5.0, top_k=50, top_p=0.95)
    a, b = (np.asarray(generate(model, tokens, sampling=hot, seed=s).tokens) for s in (1, 2))
    np.testing.assert_array_equal(a, np.asarray(generate(model, tokens, sampling=hot, seed=1).tokens))
    assert (a != b).any()
    # stop tokens: the stop token is kept, the rest is padding, lengths count up to it
    stop = int(greedy[0, 3])
    out = generate(model, tokens, sampling=SamplingConfig(max_new_tokens=10, stop_tokens=(stop,), pad_token=0))
    row = np.asarray(out.tokens)[0]
    first = int(np.argmax(greedy[0] == stop))
    np.testing.assert_array_equal(row[: first + 1], greedy[0, : first + 1])
    assert (row[first + 1 :] == 0).all() and int(out.lengths[0]) == first + 1


def test_generate_text_uses_chat_template(qwen):
    pretrained = from_pretrained(qwen)
    tokenizer = pretrained.tokenizer
    replies = generate_text(pretrained.model, tokenizer, ["hello", "a longer prompt here"],
                            sampling=SamplingConfig(max_new_tokens=8))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = generate(pretrained.model, np.asarray([ids]),
                   sampling=SamplingConfig(max_new_tokens=8, stop_tokens=(tokenizer.eos_token_id,)))
    expected = tokenizer.decode(np.asarray(out.tokens)[0][np.asarray(out.mask)[0]], skip_special_tokens=True)
    assert len(replies) == 2 and replies[0] == expected
