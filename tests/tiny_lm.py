"""Tiny decoder-LM fixtures written locally (no hub).

The torch-free ones (HF configs, nps's random weights, the byte-level BPE tokenizer) live in
``nps.lm.tiny``, where the notebooks' offline fallback uses them too; ``write_torch_model`` builds
transformers' PyTorch model (the parity reference).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nps.lm.tiny import FAMILIES, VOCAB, hf_config, write_tokenizer  # noqa: F401 (the tests import them from here)
from nps.lm.tiny import write_tiny_model as write_nps_model  # noqa: F401


def write_torch_model(directory: Path, family: str, seed: int = 0, tokenizer: bool = True, **overrides):
    """Random transformers model of ``family`` saved to ``directory``; returns it (eval mode, fp32)."""
    import torch
    import transformers

    classes = {
        "qwen2": transformers.Qwen2ForCausalLM,
        "llama": transformers.LlamaForCausalLM,
        "gemma": transformers.GemmaForCausalLM,
    }
    torch.manual_seed(seed)
    model = classes[family](hf_config(family, **overrides)).eval()
    with torch.no_grad():  # norms and biases start at constants; perturb them so that parity covers them
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    if tokenizer:
        write_tokenizer(directory)
    return model


def padded_batch(seed: int = 0, batch: int = 4, length: int = 12, vocab: int = VOCAB):
    """Tokens [B, T] and a mask with left padding, right padding and a full row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, length))
    mask = np.ones((batch, length), bool)
    if batch > 1:
        mask[1, :5] = False  # left-padded
    if batch > 2:
        mask[2, 8:] = False  # right-padded
    if batch > 3:
        mask[3, :2] = False
        mask[3, 10:] = False
    return tokens, mask
