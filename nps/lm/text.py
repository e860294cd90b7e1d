"""Text to token rows for decoder LMs: prompts and responses in a model's chat format."""

from __future__ import annotations

import numpy as np

from nps.errors import ConfigError


def option_text(prompt: str, response: str) -> str:
    """The paper's plain dialogue template (option embeddings; models without a chat template),
    with real newlines (the released code wrote a literal backslash-n)."""
    return f"Human: {prompt}\n\nAssistant: {response}"


def tokenise_chat(tokenizer, prompts: list[str], responses: list[str], max_length: int):
    """Chat-templated prompt + response tokens [M, max_length], masks, and how many were truncated.

    The response starts where the templated prompt (with the generation prompt) ends, as
    the authors' 2025 code; a tokenizer without a chat template gets "Human: …\\n\\nAssistant: ".
    """
    tokens = np.zeros((len(prompts), max_length), np.int32)
    token_mask = np.zeros((len(prompts), max_length), bool)
    response_mask = np.zeros((len(prompts), max_length), bool)
    truncated = 0
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        if tokenizer.chat_template:
            user = [{"role": "user", "content": prompt}]
            head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
            if not full.startswith(head):
                raise ConfigError("the tokenizer's chat template does not extend the prompt with the reply; "
                                  "pass a model whose template does (or one without a template)")
            tail = full[len(head):]
        else:
            head, tail = option_text(prompt, ""), response + (tokenizer.eos_token or "")
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        ids = (head_ids + tail_ids)[:max_length]
        if len(head_ids) + len(tail_ids) > max_length:
            truncated += 1
        tokens[row, : len(ids)] = ids
        token_mask[row, : len(ids)] = True
        response_mask[row, len(head_ids) : len(ids)] = True
    return tokens, token_mask, response_mask, truncated
