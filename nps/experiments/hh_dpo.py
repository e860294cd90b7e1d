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
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nps.config import check_models, config_to_dict
from nps.data.episodes import EpisodeSpec
from nps.data.pairs import PolicyOptions, oracle_pools
from nps.data.prepared import BuildParameters, embedded_preferences
from nps.data.ultrafeedback import option_pair_pool
from nps.encoder import EncoderConfig
from nps.errors import ConfigError, invalid
from nps.lm import LoRAConfig, from_pretrained
from nps.lm.text import tokenise_chat
from nps.models.peers import VPLConfig
from nps.models.policy import (
    PolicyConfig,
    SteerablePolicy,
    policy_kind,
    with_reference_log_probs,
)
from nps.results import (
    experiment_run,
    format_accuracy_table,
    plot_accuracy_vs_context,
)
from nps.train.evaluate import check_unseen_targets
from nps.train.logging import LogConfig
from nps.train.loop import TrainConfig
from nps.train.mesh import make_mesh
from nps.train.evaluate import EvalConfig

USER_NAMES = ["helpfulness", "honesty"]
# oracles: one BTL-DPO per user type's labels; vpl_dpo (VPL-DPO, the peer comparison's policy) on request
MODEL_NAMES = ("np_dpo", "vpl_dpo", "btl_dpo_mixed", "btl_dpo_oracles")
DEFAULT_MODELS = ("np_dpo", "btl_dpo_mixed", "btl_dpo_oracles")


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
    models: tuple[str, ...] = DEFAULT_MODELS
    policy: PolicyConfig = PolicyConfig(
        beta=0.05,
        encoder=EncoderConfig(inner="linear", hidden_dim=256, latent_dim=256, attention_dropout=0.0),
        vpl=VPLConfig(hidden_dim=256, latent_dim=256),  # VPL-DPO at NP-DPO's widths
        lora=LoRAConfig(rank=128, alpha=256.0, dropout=0.1, targets=("q", "v")),
    )
    episodes: EpisodeSpec = EpisodeSpec(num_targets=9, max_context=6)
    eval_num_targets: int = 13
    train: TrainConfig = TrainConfig(
        steps=1600, batch_size=2, learning_rate=1e-5, optimizer="adamw", adam_eps=3e-5, eval_every=100,
        checkpoint_every=200, val_tasks=32,
    )
    eval: EvalConfig = EvalConfig(num_tasks=500)
    log: LogConfig = LogConfig()  # training curves, evaluation, plots, traces: --set log.backend=...

    def __post_init__(self):
        if self.dtype not in ("bfloat16", "float32"):
            raise invalid("dtype", self.dtype, "must be 'bfloat16' or 'float32'")
        check_models(self.models, MODEL_NAMES)
        if self.max_length < 8:
            raise invalid("max_length", self.max_length, "is too short for a prompt and a response")
        check_unseen_targets(self.eval.context_sizes, dataclasses.replace(self.episodes, num_targets=self.eval_num_targets))
        BuildParameters("hh", self.conflict_rate, self.split_by, self.seed).validate()


def run_hh_dpo(config: HHDPOConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
               echo=print) -> dict[str, Any]:
    if not config.model or not config.data:
        raise ConfigError("hh-dpo needs --model (a model directory) and --data (UltraFeedback's train file)")
    with experiment_run("hh-dpo", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        out = run.out
        data, features, embedder, identity = embedded_preferences(
            config.data, config.embedder or config.model, out,
            BuildParameters("hh", config.conflict_rate, config.split_by, config.seed),
            {"train": config.episodes.num_targets, "val": config.episodes.num_targets, "test": config.eval_num_targets},
            dtype=config.dtype, max_length=config.embed_max_length, batch_size=config.embed_batch_size, echo=echo)
        prompts, responses = data.option_prompts(), data.options.responses

        mesh = make_mesh(fsdp=config.mesh_fsdp, tensor=config.mesh_tensor) if jax.device_count() > 1 else None
        base = from_pretrained(config.model, dtype=jnp.dtype(config.dtype), mesh=mesh)
        tokens, token_mask, response_mask, cut = tokenise_chat(base.tokenizer, prompts, responses,
                                                                     config.max_length)
        options = PolicyOptions(jnp.asarray(tokens), jnp.asarray(token_mask), jnp.asarray(response_mask),
                                jnp.asarray(features), jnp.full((len(responses),), jnp.nan, jnp.float32))
        # One copy of the base weights serves the reference and every policy (each has adapters of its own).
        reference = SteerablePolicy(base.model, features.shape[1], dataclasses.replace(config.policy, kind="btl"),
                                    rngs=nnx.Rngs(0), mesh=mesh)
        options = with_reference_log_probs(reference, options, batch_size=config.reference_batch_size)
        pools = {name: option_pair_pool(part, data.options.ratings, options) for name, part in data.splits.items()}
        data_identity = identity | {"targets_cut": cut}
        base_identity = {"path": base.identity, "weights_hash": base.weights_hash}
        eval_episodes = dataclasses.replace(config.episodes, num_targets=config.eval_num_targets,
                                            max_context=max(config.eval.context_sizes))
        jobs = []  # (name, training pools, whose labels it trains on); every policy is tested on both users
        for name in config.models:
            if name == "btl_dpo_oracles":
                jobs += [(f"btl_dpo_{user}", oracle_pools(pools, k), user) for k, user in enumerate(USER_NAMES)]
            else:
                jobs.append((name, pools, "all"))
        models = {}
        for name, job_pools, labels in jobs:
            policy_config = dataclasses.replace(config.policy, kind=policy_kind(name))
            policy = SteerablePolicy(base.model, features.shape[1], policy_config, rngs=nnx.Rngs(config.train.seed),
                                     mesh=mesh)
            run_config = {"policy": config_to_dict(policy_config), "data": data_identity | {"labels": labels},
                          "base": base_identity}
            _, models[name] = run.fit_and_evaluate(
                name, policy, job_pools, kind=policy_config.kind, episodes=config.episodes, train=config.train,
                run_config=run_config, user_names=USER_NAMES, eval_episodes=eval_episodes, mesh=mesh)
        plots = [plot_accuracy_vs_context(models, USER_NAMES, out / "accuracy_vs_context.png",
                                          "UltraFeedback HH: implicit-reward accuracy")]
        return run.finish(tables=[format_accuracy_table(models, USER_NAMES)], plots=plots, data=data_identity,
                          embedder=embedder, base=base_identity, user_types=USER_NAMES, models=models)
