"""Tiny random decoder LMs written locally, with no hub: a Hugging Face config, nps's own random
weights in safetensors and a byte-level BPE tokenizer with a ChatML template.

A stand-in for a real checkpoint wherever one cannot be downloaded: the notebooks fall back to it
when the hub is unreachable, and the tests build their models with it. Nothing here needs torch.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("qwen2", "llama", "gemma")
VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Helpful answers explain; honest answers admit what they do not know.",
    "Neural processes adapt to a user from a few of their choices.",
] * 4


def hf_config(family: str, vocab_size: int = VOCAB, **overrides):
    """A transformers config object for a tiny model of ``family`` (no torch needed)."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    elif family == "llama":
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=64)
        config = transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=False)
    elif family == "gemma":
        config = transformers.GemmaConfig(**common, head_dim=32)
    else:
        raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def write_tokenizer(directory: Path, vocab_size: int = VOCAB, bos: bool = False) -> None:
    """A byte-level BPE tokenizer (pad 0, bos 1, eos 2, ChatML template) trained on a tiny corpus.
    ``bos``: it puts <|bos|> before every text, as Llama 3's puts <|begin_of_text|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 16, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def write_tiny_model(directory: Path, family: str = "qwen2", seed: int = 0, dtype="float32", tokenizer=True,
                     bos=False, **overrides) -> dict:
    """Random weights from nps's own ``Decoder``, exported in HF layout (no torch); returns the hf config dict.
    ``directory`` then loads like any downloaded checkpoint (``nps.lm.from_pretrained``)."""
    import jax.numpy as jnp
    from flax import nnx

    from nps.lm.decoder import Decoder, DecoderConfig
    from nps.lm.loading import save_pretrained

    hf = hf_config(family, **overrides).to_dict()
    model = Decoder(DecoderConfig.from_hf(hf), dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))
    save_pretrained(model, directory, hf)
    if tokenizer:
        write_tokenizer(directory, hf["vocab_size"], bos=bos)
    return json.loads((Path(directory) / "config.json").read_text())
