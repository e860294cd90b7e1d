"""Text to token rows for decoder LMs: prompts and responses in a model's chat format."""

from __future__ import annotations

import numpy as np

from nps.errors import ConfigError


def option_text(prompt: str, response: str) -> str:
    """The paper's plain dialogue template (option embeddings; models without a chat template),
    with real newlines (the released code wrote a literal backslash-n)."""
    return f"Human: {prompt}\n\nAssistant: {response}"


def tokenise_chat(tokenizer, prompts: list[str], responses: list[str], max_length: int):
    """Chat-templated prompt + response tokens [M, max_length], masks, and what had to be cut.

    The response starts where the templated prompt (with the generation prompt) ends, as
    the authors' 2025 code; a tokenizer without a chat template gets "Human: …\\n\\nAssistant: ".
    The response is what DPO scores, so a sequence over ``max_length`` loses prompt tokens from
    the left first (the templated turn that introduces the response is kept); only a response
    that alone overflows is cut from the right, after the last quarter of the sequence is kept
    for the prompt. Returns tokens, token_mask, response_mask and ``{"prompts_cut",
    "responses_cut"}`` counts.
    """
    tokens = np.zeros((len(prompts), max_length), np.int32)
    token_mask = np.zeros((len(prompts), max_length), bool)
    response_mask = np.zeros((len(prompts), max_length), bool)
    cut = {"prompts_cut": 0, "responses_cut": 0}
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
        if len(head_ids) + len(tail_ids) > max_length:
            head_room = max(max_length - len(tail_ids), min(len(head_ids), max_length // 4))
            cut["prompts_cut"] += len(head_ids) > head_room
            cut["responses_cut"] += len(tail_ids) > max_length - head_room
            head_ids, tail_ids = head_ids[len(head_ids) - head_room:], tail_ids[: max_length - head_room]
        ids = head_ids + tail_ids
        tokens[row, : len(ids)] = ids
        token_mask[row, : len(ids)] = True
        response_mask[row, len(head_ids) : len(ids)] = True
    return tokens, token_mask, response_mask, cut
