"""Text to token rows for decoder LMs: prompts and responses in a model's chat format."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from nps.errors import ConfigError
from nps.lm.generate import SamplingConfig

# Tokens that end an assistant's turn in the chat formats nps loads (Qwen2 / ChatML, Llama 3, Gemma);
# a model's own EOS token is a stop token whatever its name.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>", "<eos>")
MAX_PROMPT_CHARACTERS = 2000  # a served prompt longer than this is refused before it is tokenised


def option_text(prompt: str, response: str) -> str:
    """The paper's plain dialogue template (option embeddings; models without a chat template),
    with real newlines (the released code wrote a literal backslash-n)."""
    return f"Human: {prompt}\n\nAssistant: {response}"


def chat_parts(tokenizer, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the templated prompt (with the generation prompt) and of the reply that follows it
    (``response`` with the template's end of turn; [] for None), as training tokenised them.

    A tokenizer without a chat template gets "Human: …\\n\\nAssistant: " and the response then EOS.
    """
    if tokenizer.chat_template:
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        if response is None:
            tail = ""
        else:
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
            if not full.startswith(head):
                raise ConfigError("the tokenizer's chat template does not extend the prompt with the reply; "
                                  "pass a model whose template does (or one without a template)")
            tail = full[len(head):]
    else:
        head = option_text(prompt, "")
        tail = "" if response is None else response + (tokenizer.eos_token or "")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    return ids(head), ids(tail)


def tokenise_chat(tokenizer, prompts: list[str], responses: list[str], max_length: int):
    """Chat-templated prompt + response tokens [M, max_length], masks, and what had to be cut.

    The response starts where the templated prompt (with the generation prompt) ends, as
    the authors' 2025 code (``chat_parts``). The response is what DPO scores, so a sequence over
    ``max_length`` loses prompt tokens from the left first (the templated turn that introduces the
    response is kept); only a response that alone overflows is cut from the right, after the last
    quarter of the sequence is kept for the prompt. Returns tokens, token_mask, response_mask and
    ``{"prompts_cut", "responses_cut"}`` counts.
    """
    tokens = np.zeros((len(prompts), max_length), np.int32)
    token_mask = np.zeros((len(prompts), max_length), bool)
    response_mask = np.zeros((len(prompts), max_length), bool)
    cut = {"prompts_cut": 0, "responses_cut": 0}
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        head_ids, tail_ids = chat_parts(tokenizer, prompt, response)
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


@dataclasses.dataclass(frozen=True)
class ChatCodec:
    """A Hugging Face tokenizer as a trained run's text codec (``nps.steering_run``): prompts in the model's
    chat template as training tokenised them, replies that stop at the model's end-of-turn tokens.

    ``max_new_tokens``: the longest reply generated (the run's training sequence length).
    """

    tokenizer: Any
    max_new_tokens: int

    @property
    def pad(self) -> int:
        return int(self.tokenizer.pad_token_id) if self.tokenizer.pad_token_id is not None else 0

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """The model's EOS and every end-of-turn marker its vocabulary holds."""
        vocabulary = self.tokenizer.get_vocab()
        stops = {vocabulary[name] for name in END_OF_TURN if name in vocabulary}
        if self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(stops))

    def check_prompt(self, prompt: str, what: str = "prompt") -> str:
        """The prompt as served (surrounding whitespace dropped); an empty or overlong one is a ``ConfigError``."""
        text = prompt.strip()
        if not text or len(text) > MAX_PROMPT_CHARACTERS:
            raise ConfigError(f"{what}: a prompt has 1 to {MAX_PROMPT_CHARACTERS} characters; got {len(text)}")
        return text

    def prompt_ids(self, prompt: str, what: str = "prompt") -> list[int]:
        """The templated prompt, ready for the reply."""
        return chat_parts(self.tokenizer, self.check_prompt(prompt, what))[0]

    def option_ids(self, prompt: str, response: str, what: str = "option") -> tuple[list[int], int]:
        """A prompt + response as the policy scores it: token ids and where the response starts."""
        head, tail = chat_parts(self.tokenizer, self.check_prompt(prompt, f"{what}.prompt"), response)
        return head + tail, len(head)

    def decode(self, tokens: Sequence[int], mask: Sequence[bool]) -> str:
        """A generated reply [N] (``mask``: the generated tokens, up to the stop token) as text."""
        tokens = np.asarray(tokens)
        keep = np.asarray(mask, bool) & ~np.isin(tokens, self.stop_tokens)
        return self.tokenizer.decode(tokens[keep], skip_special_tokens=True).strip()

    def sampling(self, temperature: float) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=temperature,
                              stop_tokens=self.stop_tokens, pad_token=self.pad)

    free_text = True  # any prompt (the app's Try page says so)

    def example_prompts(self, candidates: list[dict[str, Any]]) -> list[str]:
        """Prompts to show as examples: the candidate set's first few different ones."""
        return list(dict.fromkeys(c["prompt"] for c in candidates))[:4]
