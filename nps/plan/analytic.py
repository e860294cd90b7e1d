"""Closed-form FLOPs and per-device memory of nps's decoder programs, to hold the compiled ones against.

FLOPs count matrix multiplies (2 per multiply-add), globally per step:

- the blocks' weights: N_layers = L · (D·(H + 2·H_kv)·hd + H·hd·D + 3·D·F) parameters read by
  every token (2 FLOPs per parameter per token forward), LoRA's N_lora likewise;
- attention: 4·T·S·H·hd per layer and sequence (QKᵀ and PV over every query-key pair: the causal
  mask is applied, not skipped);
- the LM head: 2·D·V per scored position (positions padded to the loss's chunks);
- backward: with a frozen base, the gradient of the activations only (2·N_layers per token) and
  of LoRA's weights too (4·N_lora); full fine-tuning doubles every matmul (4·N); attention 2×;
- recomputation: remat "full" runs every block's forward again, "dots" only attention's
  products (the weight products are kept), "none" nothing; the loss's LM-head chunks are always
  recomputed (``nps.dpo.token_log_probs``).

So a frozen-base LoRA step is 6·N_layers + 8·N_lora per token with full remat (4·N_layers +
6·N_lora without), plus attention and the head; full fine-tuning is 8·N (6·N without remat).

Memory is per device, for a step's peak: the arguments (weights, optimiser state, data: taken
from their shardings, so exact), the activations kept for the backward pass, and the largest
temporary (a block's backward, or the head's chunk).
"""

from __future__ import annotations

import dataclasses

from nps.lm.decoder import DecoderConfig, LoRAConfig, projection_shapes


@dataclasses.dataclass(frozen=True)
class Shape:
    """Where a step's work lands: global sequences and their length, and the mesh's axes."""

    sequences: int
    length: int
    data: int
    fsdp: int
    tensor: int

    @property
    def batch_shards(self) -> int:
        return self.data * self.fsdp

    @property
    def tokens(self) -> int:
        return self.sequences * self.length

    @property
    def tokens_per_device(self) -> float:
        return self.tokens / self.batch_shards


def layer_matmul_params(config: DecoderConfig) -> int:
    """Weights one token multiplies in one block (q, k, v, o, gate, up, down)."""
    return sum(out * inn for out, inn in projection_shapes(config).values())


def lora_params(config: DecoderConfig, lora: LoRAConfig | None) -> int:
    """LoRA weights (A and B) of one block."""
    if lora is None:
        return 0
    return sum(lora.rank * (out + inn) for name, (out, inn) in projection_shapes(config).items() if name in lora.targets)


def attention_flops(config: DecoderConfig, queries: int, keys: int) -> float:
    """One block's attention products for one sequence of ``queries`` over ``keys``."""
    return 4.0 * queries * keys * config.num_heads * config.head_dim


def head_positions(length: int, chunk: int) -> int:
    """The positions the chunked loss scores (T - 1, padded to whole chunks)."""
    steps = length - 1
    chunk = max(1, min(chunk, steps))
    return -(-steps // chunk) * chunk


def train_flops(config: DecoderConfig, lora: LoRAConfig | None, shape: Shape, remat: str, logits_chunk: int,
                full_finetune: bool = False, recomputation: bool = True) -> float:
    """Global FLOPs of one training step of next-token or DPO log-probabilities (module docstring);
    ``recomputation=False``: the model's FLOPs alone (the numerator of MFU), what remat adds left out."""
    layers = config.num_layers
    weights = 2.0 * shape.tokens * layers * layer_matmul_params(config)
    adapters = 2.0 * shape.tokens * layers * lora_params(config, lora)
    attention = shape.sequences * layers * attention_flops(config, shape.length, shape.length)
    head = 2.0 * shape.sequences * head_positions(shape.length, logits_chunk) * config.hidden_size * config.vocab_size
    forward = weights + adapters + attention + head
    backward = (2 * weights if full_finetune else weights) + 2 * adapters + 2 * attention + (2 * head if full_finetune
                                                                                              else head)
    recomputed = {"none": 0.0, "full": weights + adapters + attention, "dots": attention}[remat] + head
    return forward + backward + (recomputed if recomputation else 0.0)


def forward_flops(config: DecoderConfig, lora: LoRAConfig | None, sequences: int, queries: int, keys: int,
                  logits_per_sequence: int) -> float:
    """Global FLOPs of a forward pass of ``sequences`` × ``queries`` tokens attending over ``keys``
    (a prefill, a decode step, an embedding batch), with ``logits_per_sequence`` head outputs each."""
    per_token = layer_matmul_params(config) + lora_params(config, lora)
    return (2.0 * sequences * queries * config.num_layers * per_token
            + sequences * config.num_layers * attention_flops(config, queries, keys)
            + 2.0 * sequences * logits_per_sequence * config.hidden_size * config.vocab_size)


def block_activation_bytes(config: DecoderConfig, tokens: float, keys: int, act_bytes: int, tensor: int,
                           lora: LoRAConfig | None) -> float:
    """What one block's forward produces that its backward reads, for ``tokens`` (each attending over
    ``keys``) on one device: the two norms' outputs, q, k, v and attention's output, attention's
    fp32 scores and probabilities (XLA's attention materialises both), the MLP's gate, up and their
    product, LoRA's fp32 intermediates."""
    d, f, hd = config.hidden_size, config.intermediate_size / tensor, config.head_dim
    heads, kv = config.num_heads / tensor, config.num_kv_heads / tensor
    per_token = (act_bytes * (2 * d + 2 * heads * hd + 2 * kv * hd + 3 * f) + 2 * 4 * heads * keys
                 + 4 * (lora.rank * len(lora.targets) if lora is not None else 0))
    return tokens * per_token


def block_gradient_bytes(config: DecoderConfig, tokens: float, keys: int, act_bytes: int, tensor: int) -> float:
    """The larger of a block's two gradient phases on one device: the MLP's (gate, up and product,
    and the block's input) or attention's (fp32 scores and probabilities; q, k, v)."""
    d, f, hd = config.hidden_size, config.intermediate_size / tensor, config.head_dim
    heads, kv = config.num_heads / tensor, config.num_kv_heads / tensor
    mlp = act_bytes * (3 * f + d)
    attention = 2 * 4 * heads * keys + act_bytes * (heads * hd + 2 * kv * hd)
    return tokens * max(mlp, attention)


def saved_activation_bytes(config: DecoderConfig, shape: Shape, remat: str, act_bytes: int,
                           lora: LoRAConfig | None) -> float:
    """Activations one device keeps from the forward pass for the backward pass."""
    tokens = shape.tokens_per_device
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv = config.num_heads / shape.tensor, config.num_kv_heads / shape.tensor
    if remat == "full":
        per_layer = act_bytes * d * tokens
    elif remat == "dots":
        lora_out = 4 * lora.rank * len(lora.targets) if lora is not None else 0
        per_layer = tokens * (act_bytes * (3 * d + heads * hd + 2 * kv * hd + 2 * f / shape.tensor) + lora_out)
    else:  # the block input, and everything its backward reads
        per_layer = act_bytes * d * tokens + block_activation_bytes(config, tokens, shape.length, act_bytes,
                                                                     shape.tensor, lora)
    return config.num_layers * per_layer + 2 * act_bytes * d * tokens  # + the final norm's input and output


def layer_weight_bytes(config: DecoderConfig, weight_bytes: int, tensor: int) -> float:
    """One block's weights on one device once gathered over fsdp (still split over tensor)."""
    return weight_bytes * layer_matmul_params(config) / tensor


def train_temporary_bytes(config: DecoderConfig, shape: Shape, act_bytes: int, weight_bytes: int,
                          lora: LoRAConfig | None, logits_chunk: int, vocab_parallel: bool) -> dict[str, float]:
    """The largest working sets of a training step on one device: a block's backward (what its
    backward reads, recomputed, the larger of its gradient phases, and two blocks' gathered weights:
    the one in use and the next, prefetched) and the loss's head chunk (fp32 logits, their
    exponentials and gradient)."""
    tokens = shape.tokens_per_device
    block = (block_activation_bytes(config, tokens, shape.length, act_bytes, shape.tensor, lora)
             + block_gradient_bytes(config, tokens, shape.length, act_bytes, shape.tensor)
             + 2 * layer_weight_bytes(config, weight_bytes, shape.tensor))
    chunk = max(1, min(logits_chunk, shape.length - 1))
    if vocab_parallel:  # every sequence of the data shard, the vocabulary split over the model axes
        logits = shape.sequences / shape.data * chunk * config.vocab_size / (shape.fsdp * shape.tensor)
    else:
        logits = shape.sequences / shape.batch_shards * chunk * config.vocab_size / shape.tensor
    return {"block backward": block, "head chunk": 3 * 4 * logits}


def kv_cache_bytes(config: DecoderConfig, batch: int, length: int, act_bytes: int, batch_shards: int,
                   tensor: int) -> float:
    """Keys and values of every block for ``batch`` sequences of ``length`` slots, on one device."""
    kv_split = tensor if config.num_kv_heads % tensor == 0 else 1
    shards = (batch_shards if batch % batch_shards == 0 else 1) * kv_split
    return 2 * config.num_layers * batch * length * config.num_kv_heads * config.head_dim * act_bytes / shards
