"""The programs a plan compiles: the very ones ``fit``, ``train_language_model``, ``generate`` and
``embed`` run, lowered with abstract weights (``nnx.eval_shape``: shapes and shardings, no values).

Each job builds its model as the library does, asks the library for its program
(``TrainProgram``, ``NextTokenProgram``, the jitted ``_generate`` and ``_last_token_states``),
places abstract inputs where the library would place real ones, and lowers. Nothing here is a
copy of a training step made for planning: a change to ``fit`` changes the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.data.episodes import EpisodeSpec
from nps.data.pairs import OptionPairPool, PairPool, PolicyOptions
from nps.encoder import EncoderConfig
from nps.errors import ConfigError
from nps.lm.generate import SamplingConfig
from nps.lm.generate import _generate as generation_program
from nps.lm.generate import _last_token_states as embedding_program
from nps.lm.decoder import REMAT_POLICIES, Decoder, DecoderConfig, LoRAConfig
from nps.lm.sharding import shardings_of
from nps.models.policy import PolicyConfig, SteerablePolicy
from nps.models.reward import UF_NP_BTL, NPReward
from nps.plan import analytic
from nps.train.distributed import put_global
from nps.train.loop import TrainConfig, TrainProgram
from nps.train.mesh import batch_sharding, replicated
from nps.train.next_token import LMTrainConfig, NextTokenProgram

JOBS = {
    "np-dpo": "NP-DPO: LoRA + FiLM + context encoder, conditional DPO (fit)",
    "dpo": "BTL-DPO / LoRA-DPO: LoRA, plain DPO (fit)",
    "full-ft": "full fine-tuning, next-token loss, AdamW on every weight (train_language_model)",
    "np-btl": "NP-BTL reward model on cached option features (fit)",
    "embed": "option embedding: last-token hidden states (embed)",
    "generate": "steered generation with a KV cache (generate, NP-DPO's FiLM on)",
}
DECODER_JOBS = ("np-dpo", "dpo", "full-ft", "embed", "generate")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What to plan: a job on a decoder, its batch and sequence lengths, and its settings."""

    job: str
    decoder: DecoderConfig
    dtype: str = "bfloat16"  # the base's weights (full-ft: the trained weights)
    batch: int = 16  # tasks per step (np-dpo, dpo, np-btl); sequences (full-ft, embed, generate)
    targets: int = 4  # target pairs per task (N^T)
    context: int = 6  # context capacity (N^C at most)
    length: int = 512  # tokens per sequence (generate: the prompt)
    new_tokens: int = 3584  # generate: tokens generated after the prompt (cache = length + new_tokens)
    remat: str = "full"
    lora: LoRAConfig = LoRAConfig(rank=128, alpha=256.0, targets=("q", "v"))
    feature_dim: int = 4096  # the context encoder's option features (the paper: Llama-3-8B's)
    latent_dim: int = 256
    pairs: int = 28763  # the training pool (UltraFeedback HH's train split)
    options: int = 71890  # rows of its options table (the HH pairs' responses)
    logits_chunk: int = 32

    def __post_init__(self):
        if self.job not in JOBS:
            raise ConfigError(f"--job={self.job!r} is unknown; use one of {', '.join(JOBS)}")
        if self.dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"--dtype={self.dtype!r} is unknown; use bfloat16 or float32")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"--remat={self.remat!r} is unknown; use one of {', '.join(REMAT_POLICIES)}")
        if self.job in ("np-dpo", "dpo", "np-btl") and self.targets < 1:
            raise ConfigError(f"--targets={self.targets} must be at least 1")
        for name in ("batch", "length", "pairs", "options", "feature_dim", "latent_dim", "new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")

    @property
    def sequences(self) -> int:
        """Sequences one step runs through the decoder (np-dpo, dpo: chosen and rejected of every target)."""
        return self.batch * self.targets * 2 if self.job in ("np-dpo", "dpo") else self.batch

    @property
    def tokens(self) -> int:
        """Tokens one step processes (generate: the prompts)."""
        return 0 if self.job == "np-btl" else self.sequences * self.length


@dataclasses.dataclass
class Program:
    """One lowered program and how to run it again on real devices."""

    name: str
    lowered: Any  # jax.stages.Lowered
    args: tuple  # its abstract arguments (shapes, dtypes, shardings)
    next_args: Callable[[tuple, Any], tuple]  # (arguments, outputs) -> the next call's arguments
    flops: float  # the analytic global FLOPs of one call, recomputation included (what the devices run)
    memory: dict[str, float]  # analytic per-device bytes: saved activations, temporaries
    flops_note: str
    unread_bytes: float = 0.0  # per device: arguments the program never reads (XLA allocates none)
    model_flops: float | None = None  # without what remat recomputes: MFU's numerator (default: ``flops``)


def build(workload: Workload, mesh) -> Program:
    """The program of ``workload`` on ``mesh``, lowered."""
    return {"np-dpo": _policy_fit, "dpo": _policy_fit, "np-btl": _reward_fit, "full-ft": _next_token,
            "embed": _embed, "generate": _generate}[workload.job](workload, mesh)


def _dtype(workload: Workload):
    return jnp.dtype(workload.dtype)


def _abstract(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _key() -> jax.ShapeDtypeStruct:
    return jax.eval_shape(lambda: jax.random.key(0))


def _chunk_again(args: tuple, outputs) -> tuple:
    """A train chunk's next arguments: its state replaced by the one it returned (donated)."""
    return (outputs[0], *args[1:])


def _policy(workload: Workload) -> SteerablePolicy:
    config = PolicyConfig(
        kind="np" if workload.job in ("np-dpo", "generate") else "btl",
        encoder=EncoderConfig(inner="linear", hidden_dim=256, latent_dim=workload.latent_dim, attention_dropout=0.0),
        lora=workload.lora, remat=workload.remat, logits_chunk=workload.logits_chunk)
    return nnx.eval_shape(lambda: SteerablePolicy(
        Decoder(workload.decoder, dtype=_dtype(workload), rngs=nnx.Rngs(0)), workload.feature_dim, config,
        rngs=nnx.Rngs(0)))


def _pool(workload: Workload, options) -> OptionPairPool | PairPool:
    pairs = PairPool(_abstract((workload.pairs, 1), jnp.int32), _abstract((workload.pairs, 1), jnp.int32),
                     _abstract((workload.pairs, 2), jnp.float32), _abstract((workload.pairs, 2), jnp.float32))
    return OptionPairPool(pairs, options)


def _fit_program(model, pool, spec: EpisodeSpec, train: TrainConfig, mesh):
    """``fit``'s program for ``model`` and its placed abstract arguments."""
    program, frozen, params = TrainProgram.of(model, spec, train, mesh)
    state, frozen, pool = program.place(program.initial_state(params), frozen, pool)
    key = put_global(_key(), replicated(mesh))
    return program, (state, frozen, pool, key, key)


def _train_config(workload: Workload) -> TrainConfig:
    return TrainConfig(steps=1000, batch_size=workload.batch, learning_rate=1e-5, optimizer="adamw", adam_eps=3e-5,
                       val_tasks=workload.batch, eval_every=100, checkpoint_every=100)


def _policy_fit(workload: Workload, mesh) -> Program:
    """NP-DPO / DPO: ``fit``'s chunk over a policy on the abstract decoder, episodes from an options
    table of token rows, option features and precomputed reference log-probabilities."""
    options = PolicyOptions(_abstract((workload.options, workload.length), jnp.int32),
                            _abstract((workload.options, workload.length), bool),
                            _abstract((workload.options, workload.length), bool),
                            _abstract((workload.options, workload.feature_dim), jnp.float32),
                            _abstract((workload.options,), jnp.float32))
    spec = EpisodeSpec(num_targets=workload.targets, max_context=min(workload.context, workload.targets))
    program, args = _fit_program(_policy(workload), _pool(workload, options), spec, _train_config(workload), mesh)
    shape = _shape(workload, mesh)
    lora = workload.lora
    flops = analytic.train_flops(workload.decoder, lora, shape, workload.remat, workload.logits_chunk)
    return Program("fit: one training step", program.lower_chunk(*args, length=1), args, _chunk_again, flops,
                   _train_memory(workload, shape, lora, vocab_parallel=True),
                   "6·N_layers + 8·N_lora per token with full remat (4·N_layers + 6·N_lora without), + attention + head",
                   model_flops=analytic.train_flops(workload.decoder, lora, shape, workload.remat,
                                                    workload.logits_chunk, recomputation=False))


def _reward_fit(workload: Workload, mesh) -> Program:
    """NP-BTL on cached features: ``fit``'s chunk over the paper's UltraFeedback NP-BTL."""
    model = nnx.eval_shape(lambda: NPReward(workload.feature_dim, UF_NP_BTL, rngs=nnx.Rngs(0)))
    features = _abstract((workload.pairs, workload.feature_dim), jnp.float32)
    utility = _abstract((workload.pairs, 2), jnp.float32)
    spec = EpisodeSpec(num_targets=workload.targets, max_context=min(workload.context, workload.targets))
    program, args = _fit_program(model, PairPool(features, features, utility, utility), spec, _train_config(workload),
                                 mesh)
    return Program("fit: one training step", program.lower_chunk(*args, length=1), args, _chunk_again,
                   program.step_flops(*args), {},
                   "the step as written, counted from its jaxpr (matmuls × scan lengths, recomputation included)")


def _next_token(workload: Workload, mesh) -> Program:
    """Full fine-tuning: ``train_language_model``'s chunk, AdamW on every weight."""
    model = nnx.eval_shape(lambda: Decoder(workload.decoder, dtype=_dtype(workload), rngs=nnx.Rngs(0)))
    config = LMTrainConfig(steps=1000, batch_size=workload.batch, remat=workload.remat)
    program, weights, rest = NextTokenProgram.of(model, config, mesh)
    rows = max(workload.batch, 1024)
    tokens = _abstract((rows, workload.length), jnp.int32)
    state, tokens, mask, rest = program.place(program.initial_state(weights), tokens,
                                              _abstract((rows, workload.length), bool), rest)
    key = put_global(_key(), replicated(mesh))
    start = put_global(_abstract((), jnp.int32), replicated(mesh))
    args = (state, rest, tokens, mask, key, start)
    shape = _shape(workload, mesh)
    flops = analytic.train_flops(workload.decoder, None, shape, workload.remat, 128, full_finetune=True)
    return Program("train_language_model: one step", program.lower_chunk(*args, length=1), args, _chunk_again, flops,
                   _train_memory(workload, shape, None, vocab_parallel=True, logits_chunk=128),
                   "8·N per token with full remat (6·N without), + attention + head",
                   model_flops=analytic.train_flops(workload.decoder, None, shape, workload.remat, 128,
                                                    full_finetune=True, recomputation=False))


def _placed_decoder(model, mesh):
    """(graphdef, state) of an abstract model with every variable on its sharding."""
    graphdef, state = nnx.split(model)
    return graphdef, put_global(nnx.to_pure_dict(state), shardings_of(state, mesh))


def _embed(workload: Workload, mesh) -> Program:
    """``embed``'s program: last-token states of a batch of sequences."""
    model = nnx.eval_shape(lambda: Decoder(workload.decoder, dtype=_dtype(workload), rngs=nnx.Rngs(0)))
    graphdef, state = _placed_decoder(model, mesh)
    batch = batch_sharding(mesh)
    tokens = put_global(_abstract((workload.batch, workload.length), jnp.int32), batch)
    mask = put_global(_abstract((workload.batch, workload.length), bool), batch)
    args = (state, tokens, mask)
    lowered = embedding_program.lower(graphdef, state, tokens, mask, mesh)
    config, shape = workload.decoder, _shape(workload, mesh)
    flops = analytic.forward_flops(config, None, workload.batch, workload.length, workload.length, 0)
    memory = {"a block's activations": analytic.block_activation_bytes(
        config, shape.tokens_per_device, workload.length, _dtype(workload).itemsize, shape.tensor, None)}
    head = state.get("lm_head")
    return Program("embed: one batch", lowered, args, lambda args, outputs: args, flops, memory,
                   "2·N_layers per token + attention (no head)",
                   unread_bytes=0.0 if head is None else _device_bytes(head))


def _generate(workload: Workload, mesh) -> Program:
    """``generate``'s program: an NP-DPO policy's steered decoder (LoRA and FiLM on), a KV cache of
    prompt + new tokens, sampling at temperature 1."""
    policy = _policy(workload)
    graphdef, state = _placed_decoder(policy.lm, mesh)
    batch = batch_sharding(mesh) if workload.batch % _batch_shards(mesh) == 0 else replicated(mesh)
    tokens = put_global(_abstract((workload.batch, workload.length), jnp.int32), batch)
    mask = put_global(_abstract((workload.batch, workload.length), bool), batch)
    z = put_global(_abstract((workload.batch, workload.latent_dim), jnp.float32), batch)
    key = put_global(_key(), replicated(mesh))
    sampling = SamplingConfig(max_new_tokens=workload.new_tokens, temperature=1.0)
    args = (state, tokens, mask, key, z)
    lowered = generation_program.lower(graphdef, state, tokens, mask, key, z, sampling, mesh)
    config, cache = workload.decoder, workload.length + workload.new_tokens
    flops = (analytic.forward_flops(config, workload.lora, workload.batch, workload.length, cache, 1)
             + analytic.forward_flops(config, workload.lora, workload.batch, 1, cache, 1))
    shape = _shape(workload, mesh)
    act = _dtype(workload).itemsize
    memory = {
        "KV cache": analytic.kv_cache_bytes(config, workload.batch, cache, act, shape.batch_shards, shape.tensor),
        "a block's activations": analytic.block_activation_bytes(
            config, workload.batch * workload.length / shape.batch_shards, cache, act, shape.tensor, workload.lora),
    }
    return Program("generate: prefill + one decode step", lowered, args, lambda args, outputs: args, flops, memory,
                   "prefill (2·N per prompt token + attention over the cache) + one decode step")


def _device_bytes(leaf: jax.ShapeDtypeStruct) -> float:
    return float(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize


def _batch_shards(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _shape(workload: Workload, mesh) -> analytic.Shape:
    return analytic.Shape(workload.sequences, workload.length, mesh.shape["data"], mesh.shape["fsdp"],
                          mesh.shape["tensor"])


def _train_memory(workload: Workload, shape: analytic.Shape, lora, *, vocab_parallel: bool,
                  logits_chunk: int | None = None) -> dict[str, float]:
    config, act = workload.decoder, _dtype(workload).itemsize
    saved = analytic.saved_activation_bytes(config, shape, workload.remat, act, lora)
    temporaries = analytic.train_temporary_bytes(config, shape, act, act, lora, logits_chunk or workload.logits_chunk,
                                                 vocab_parallel)
    return {"saved activations": saved} | temporaries
