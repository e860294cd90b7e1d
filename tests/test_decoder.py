"""The decoder's own invariants: attention, the KV cache, padding, LoRA, FiLM, sampling (no torch needed).

Agreement with transformers' PyTorch models is tested in test_decoder_parity.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_lm import FAMILIES, padded_batch, write_nps_model

from nps.layers import BaseParam
from nps.lm import KVCache, LoRAConfig, SamplingConfig, embed, from_pretrained, generate, generate_text
from nps.lm.decoder import DecoderConfig, attention, rope_frequencies
from nps.lm.loading import CheckpointFormatError
from nps.lm.lora import load_adapters, merge_lora, save_adapters
from nps.models import ConditionedDecoder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    write_nps_model(directory, "qwen2", seed=3)
    return directory


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    write_nps_model(directory, request.param, seed=4, tokenizer=False)
    return from_pretrained(directory, tokenizer=False).model


def reference_attention(q, k, v, allowed):
    """Attention by definition, one query head at a time: softmax(q·k / √d over allowed keys)·v."""
    q, k, v, allowed = (np.asarray(x, np.float64) for x in (q, k, v, allowed))
    heads, kv_heads = q.shape[2], k.shape[2]
    out = np.zeros(q.shape)
    for head in range(heads):
        kv = head // (heads // kv_heads)  # query heads share key/value heads in contiguous groups
        scores = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(q.shape[-1])
        scores = np.where(allowed, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, head] = np.einsum("bts,bsd->btd", probs / probs.sum(-1, keepdims=True), v[:, :, kv])
    return out


def test_attention_is_grouped_query_softmax_over_allowed_keys():
    """The fused-attention call against the definition: grouped heads, a cache longer than the queries, padding."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 3, 6, 8))  # B, T, H, hd
    k, v = (jax.random.normal(key, (2, 7, 2, 8)) for key in keys[1:])  # B, S, H_kv, hd: 3 query heads per kv head
    slots = np.arange(7)
    allowed = (slots[None, None, :] <= 4 + np.arange(3)[None, :, None]) & (slots >= 1)[None, None, :]
    allowed = np.repeat(allowed, 2, axis=0)
    allowed[1, :, :3] = False  # another padding pattern in the second row
    got = attention(q, k, v, jnp.asarray(allowed))
    chex.assert_shape(got, q.shape)
    np.testing.assert_allclose(np.asarray(got), reference_attention(q, k, v, allowed), atol=1e-5)
    nothing = attention(q, k, v, jnp.zeros_like(allowed))  # a padding query: finite, not NaN
    assert np.isfinite(np.asarray(nothing)).all()


def test_padding_does_not_change_real_tokens(family_model):
    tokens, mask = padded_batch()
    full = np.asarray(family_model(jnp.asarray(tokens), jnp.asarray(mask)))
    for row in range(tokens.shape[0]):  # each row run alone, unpadded
        alone = np.asarray(family_model(jnp.asarray(tokens[row : row + 1, mask[row]])))
        np.testing.assert_allclose(full[row, mask[row]], alone[0], atol=1e-5)


def test_kv_cache_decoding_gives_the_full_forward(family_model):
    """A prompt prefilled into the cache, then one token per call: the same hidden states as one pass."""
    tokens, mask = padded_batch(seed=5, length=10)
    mask[:, 6:] = True  # left padding only, as generation aligns prompts
    config = family_model.config
    full, _ = family_model.hidden_states(jnp.asarray(tokens), jnp.asarray(mask))
    cache = KVCache.empty(config, tokens.shape[0], tokens.shape[1], family_model.dtype)
    prefix, cache = family_model.hidden_states(jnp.asarray(tokens[:, :6]), jnp.asarray(mask[:, :6]), cache=cache)
    steps = [prefix]
    for slot in range(6, tokens.shape[1]):
        step, cache = family_model.hidden_states(jnp.asarray(tokens[:, slot : slot + 1]),
                                                 jnp.asarray(mask[:, slot : slot + 1]), cache=cache, cache_index=slot)
        steps.append(step)
    chex.assert_shape(cache.keys, (config.num_layers, 4, 10, config.num_kv_heads, config.head_dim))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1))[mask], np.asarray(full)[mask], atol=1e-5)


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


def test_blocks_are_stacked_modules_with_logical_axes(qwen):
    """Per-block weights are one module's, stacked on an unsplit leading layer axis named in their metadata."""
    model = from_pretrained(qwen, tokenizer=False, lora=LoRAConfig(rank=2)).model
    config = model.config
    q = model.blocks.attn.q
    chex.assert_shape(q.weight[...], (config.num_layers, config.num_heads * config.head_dim, config.hidden_size))
    assert q.weight.get_metadata()["out_sharding"] == ("layers", "heads", "embed")
    assert model.blocks.mlp.down.weight.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    assert model.embed.get_metadata()["out_sharding"] == ("vocab", "embed")
    chex.assert_shape(q.lora.a[...], (config.num_layers, 2, config.hidden_size))


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
    trainable_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert trainable_paths == {
        "decoder/blocks/attn/q/lora/a", "decoder/blocks/attn/q/lora/b", "decoder/blocks/attn/v/lora/a",
        "decoder/blocks/attn/v/lora/b", "film/gamma_kernel", "film/gamma_bias", "film/beta_kernel", "film/beta_bias",
    }
    frozen_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)}
    assert {"decoder/blocks/attn/q/weight", "decoder/embed", "decoder/lm_head"} <= frozen_paths
    assert not frozen_paths & trainable_paths


def test_lora_dropout_only_with_a_key(qwen):
    model = from_pretrained(qwen, tokenizer=False, lora=LoRAConfig(rank=4, dropout=0.5)).model
    perturb(nnx.state(model, nnx.LoRAParam))
    tokens = jnp.asarray(padded_batch()[0])
    np.testing.assert_array_equal(model(tokens), model(tokens))
    dropped = model(tokens, dropout_key=jax.random.key(0))
    assert np.abs(np.asarray(dropped - model(tokens))).max() > 1e-3
    np.testing.assert_array_equal(dropped, model(tokens, dropout_key=jax.random.key(0)))


def test_merge_and_adapter_round_trip(qwen, tmp_path):
    tokens, mask = (jnp.asarray(x) for x in padded_batch())
    pretrained = from_pretrained(qwen, tokenizer=False, lora=LoRAConfig(rank=4, targets=("q", "v", "gate")))
    model = pretrained.model
    perturb(nnx.state(model, nnx.LoRAParam))
    adapted = np.asarray(model(tokens, mask))

    save_adapters(model, tmp_path / "adapters", base_identity=pretrained.identity,
                  base_weights_hash=pretrained.weights_hash)
    fresh = from_pretrained(qwen, tokenizer=False)
    load_adapters(fresh.model, tmp_path / "adapters", base_weights_hash=fresh.weights_hash)
    np.testing.assert_array_equal(fresh.model(tokens, mask), adapted)

    merge_lora(model)
    assert model.lora_config is None and not nnx.state(model, nnx.LoRAParam)
    np.testing.assert_allclose(model(tokens, mask), adapted, atol=1e-5)


def test_adapters_refuse_another_base(qwen, tmp_path):
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


def test_a_key_per_sequence_samples_each_as_it_would_alone_in_any_batch(qwen):
    model = from_pretrained(qwen, tokenizer=False).model
    tokens, mask = padded_batch(seed=6, batch=3, length=7)
    hot = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=40, top_p=0.9)
    keys = jax.vmap(jax.random.key)(jnp.arange(20, 23))
    together = np.asarray(generate(model, tokens, mask, sampling=hot, seed=keys).tokens)
    chex.assert_shape(together, (3, 10))
    for row in range(3):  # alone, with its seed as the batch's key, and in another batch order
        alone = generate(model, tokens[row : row + 1], mask[row : row + 1], sampling=hot, seed=20 + row)
        np.testing.assert_array_equal(together[row], np.asarray(alone.tokens)[0])
    reordered = np.asarray(generate(model, tokens[::-1], mask[::-1], sampling=hot, seed=keys[::-1]).tokens)
    np.testing.assert_array_equal(reordered, together[::-1])
    assert (together[0] != together[1]).any()


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


def test_embedding_is_the_last_real_tokens_final_state(qwen):
    pretrained = from_pretrained(qwen)
    texts = ["Human: hello\n\nAssistant: hi there", "a", "The quick brown fox jumps over the lazy dog."]
    ours = embed(pretrained.model, pretrained.tokenizer, texts, batch_size=2)
    for text, vector in zip(texts, ours):
        ids = jnp.asarray([pretrained.tokenizer(text, add_special_tokens=False)["input_ids"]])
        hidden, _ = pretrained.model.hidden_states(ids)
        np.testing.assert_allclose(vector, np.asarray(hidden[0, -1]), atol=1e-5)
