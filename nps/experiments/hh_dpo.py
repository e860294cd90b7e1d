"""`nps reproduce hh-dpo`: the paper's NP-DPO configuration on UltraFeedback HH, from local files.

    nps reproduce hh-dpo --model path/to/Qwen2.5-1.5B-Instruct --data path/to/ultrafeedback.jsonl \\
        [--set embedder=path/to/Meta-Llama-3-8B] [--set ...]

Defaults are the authors' 2025 configuration (paper §3.4): Qwen2.5-1.5B-Instruct with its
chat template, max length 512, LoRA r 128 / α 256 / dropout 0.1 on q and v, AdamW lr 1e-5,
β 0.05, 2 tasks per batch, N^C ~ U{0..6}, N^T = 9 (13 at test), context features from
a frozen LLM's last-token state (the paper: Llama-3-8B; default here: the policy's own
base), HH pairs at conflict rate 1.0 split 80/10/10 by pair. The pipeline: read →
pairs → tokenise targets with the chat template (response start from the templated
prompt) → embed options (cached, resumable) → precompute reference log-probs → train
NP-DPO, BTL-DPO (mixed) and one BTL-DPO oracle per user type → implicit-reward accuracy vs N^C per user.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.config import check_models, config_to_dict
from nps.data.embedding_cache import embed_options_cached, embedder_identity, option_text
from nps.data.episodes import EpisodeSpec, oracle_pools
from nps.data.prepared import BuildParameters, prepared_or_prepare
from nps.data.ultrafeedback import option_pair_pool
from nps.encoder import EncoderConfig
from nps.errors import ConfigError
from nps.experiments.report import finish_run, format_accuracy_table, plot_accuracy_vs_context, prepare_output_dir
from nps.experiments.runner import EvalConfig, fit_and_evaluate
from nps.models import LoRAConfig, from_pretrained
from nps.models.policy import PolicyConfig, PolicyOptions, SteerablePolicy, with_reference_log_probs
from nps.train.loop import TrainConfig
from nps.train.mesh import make_mesh

USER_NAMES = ["helpfulness", "honesty"]
MODEL_NAMES = ("np_dpo", "btl_dpo_mixed", "btl_dpo_oracles")  # oracles: one BTL-DPO per user type's labels


@dataclasses.dataclass(frozen=True)
class HHDPOConfig:
    model: str = ""  # the policy's base: a local Qwen2/Llama/Gemma directory (or a hub id where reachable)
    data: str = ""  # UltraFeedback's train split (JSON lines or parquet) or a dataset from `nps prepare hh`
    embedder: str = ""  # the frozen model for context features (paper: Llama-3-8B); "" = the policy's base
    dtype: str = "bfloat16"  # base weights (LoRA, FiLM, encoder stay fp32)
    conflict_rate: float = 1.0
    split_by: str = "pair"
    seed: int = 42
    max_length: int = 512
    embed_max_length: int = 1024
    embed_batch_size: int = 16
    reference_batch_size: int = 16
    # With several devices: the base is sharded over fsdp × tensor, tasks over data × fsdp
    # (data = the devices left over); LoRA, FiLM and the encoder are replicated.
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    models: tuple[str, ...] = MODEL_NAMES
    policy: PolicyConfig = PolicyConfig(
        beta=0.05,
        encoder=EncoderConfig(inner="linear", hidden_dim=256, latent_dim=256, attention_dropout=0.0),
        lora=LoRAConfig(rank=128, alpha=256.0, dropout=0.1, targets=("q", "v")),
    )
    episodes: EpisodeSpec = EpisodeSpec(num_targets=9, max_context=6)
    eval_num_targets: int = 13
    train: TrainConfig = TrainConfig(
        steps=1600, batch_size=2, learning_rate=1e-5, optimizer="adamw", adam_eps=3e-5, eval_every=100,
        checkpoint_every=200, val_tasks=32,
    )
    eval: EvalConfig = EvalConfig(num_tasks=500)

    def validate(self) -> None:
        if not self.model or not self.data:
            raise ConfigError("hh-dpo needs --model (a model directory) and --data (UltraFeedback's train file)")
        if self.dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"dtype={self.dtype!r} must be 'bfloat16' or 'float32'")
        check_models(self.models, MODEL_NAMES)
        if self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length} is too short for a prompt and a response")
        self.policy.validate()
        self.episodes.validate()
        self.train.validate()
        self.eval.validate()


def tokenise_targets(tokenizer, prompts: list[str], responses: list[str], max_length: int):
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


def run_hh_dpo(config: HHDPOConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
               echo=print) -> dict[str, Any]:
    config.validate()
    start = time.perf_counter()
    out = prepare_output_dir(out, fresh)
    data = prepared_or_prepare(config.data, out / "dataset",
                               BuildParameters("hh", config.conflict_rate, config.split_by, config.seed), echo)
    splits = data.splits
    data.require_pairs({"train": config.episodes.num_targets, "val": config.episodes.num_targets,
                        "test": config.eval_num_targets})
    prompts, responses = data.option_prompts(), data.options.responses
    features, embedder = embed_options_cached(
        config.embedder or config.model, prompts, responses, data.directory / "embeddings", dtype=config.dtype,
        max_length=config.embed_max_length, batch_size=config.embed_batch_size, echo=echo)

    mesh = make_mesh(fsdp=config.mesh_fsdp, tensor=config.mesh_tensor) if jax.device_count() > 1 else None
    base = from_pretrained(config.model, dtype=jnp.dtype(config.dtype), mesh=mesh)
    tokens, token_mask, response_mask, truncated = tokenise_targets(base.tokenizer, prompts, responses,
                                                                    config.max_length)
    options = PolicyOptions(jnp.asarray(tokens), jnp.asarray(token_mask), jnp.asarray(response_mask),
                            jnp.asarray(features), jnp.full((len(responses),), jnp.nan, jnp.float32))
    # One copy of the base weights serves the reference and every policy; each policy gets fresh adapters.
    reference = SteerablePolicy(base.model, features.shape[1], dataclasses.replace(config.policy, kind="btl"),
                                rngs=nnx.Rngs(0))
    options = with_reference_log_probs(reference, options, batch_size=config.reference_batch_size)
    pools = {name: option_pair_pool(part, data.options.ratings, options) for name, part in splits.items()}
    data_identity = data.identity() | {"truncated_targets": truncated, "embedder": embedder_identity(embedder)}
    base_identity = {"path": base.identity, "weights_hash": base.weights_hash}
    eval_spec = dataclasses.replace(config.episodes, num_targets=config.eval_num_targets,
                                    max_context=max(config.eval.context_sizes))
    models = {}
    jobs = []  # (name, training pools, whose labels it trains on); every policy is tested on both users
    for name in config.models:
        if name == "btl_dpo_oracles":
            jobs += [(f"btl_dpo_{user}", oracle_pools(pools, k), user) for k, user in enumerate(USER_NAMES)]
        else:
            jobs.append((name, pools, "all"))
    for name, job_pools, labels in jobs:
        kind = "np" if name == "np_dpo" else "btl"
        policy_config = dataclasses.replace(config.policy, kind=kind)
        base.model.add_lora(policy_config.lora, rngs=nnx.Rngs(config.train.seed), mesh=mesh)
        policy = SteerablePolicy(base.model, features.shape[1], policy_config, rngs=nnx.Rngs(config.train.seed))
        run_config = {"policy": config_to_dict(policy_config), "data": data_identity | {"labels": labels},
                      "base": base_identity}
        _, models[name] = fit_and_evaluate(
            name, policy, kind, run_config, job_pools, config.episodes, config.train, config.eval, out, USER_NAMES,
            progress=progress, eval_spec=eval_spec, mesh=mesh,
        )
    plots = [plot_accuracy_vs_context(models, USER_NAMES, out / "accuracy_vs_context.png",
                                      "UltraFeedback HH: implicit-reward accuracy")]
    return finish_run(
        out, start, echo, tables=[format_accuracy_table(models, USER_NAMES)], plots=plots, experiment="hh-dpo",
        config=config_to_dict(config), data=data_identity, embedder=embedder, base=base_identity,
        user_types=USER_NAMES, models=models,
    )
