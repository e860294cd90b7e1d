"""NP-DPO: a policy π(y | x, 𝒟^C) steered by a user's context pairs (paper §3), and standard DPO.

``SteerablePolicy`` = context encoder (option features of the context pairs -> z) +
FiLM-conditioned decoder with LoRA. Its ``objective`` is conditional DPO (Eq. 24)
averaged over each task's target pairs, against the unconditioned base as reference
(the same weights with LoRA and FiLM off). ``kind="btl"`` is the BTL-DPO baseline:
no encoder, no FiLM, plain DPO (Eq. 25). ``kind="vpl"`` is VPL-DPO, the peer comparison's
policy: VPL's variational encoder (``nps.models.peers.vpl``) in place of NP's, trained by the
same conditional DPO plus VPL's annealed KL to the N(0, I) prior, with z sampled and projected
onto the sphere in training and z = μ otherwise. All are preference models like the reward
models (``nps.models.interface``): episodes come from an ``OptionPairPool`` whose table
is ``PolicyOptions``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nps.config import check_positive
from nps.data.episodes import Episodes
from nps.data.pairs import PolicyOptions
from nps.dpo import dpo_log_odds, response_log_probs
from nps.encoder import ContextEncoder, EncoderConfig
from nps.errors import invalid
from nps.likelihood import choice_accuracy, choice_nll
from nps.lm.decoder import REMAT_POLICIES, Decoder, LoRAConfig
from nps.lm.sharding import constrain, mesh_of, on_mesh
from nps.models.film import ConditionedDecoder
from nps.models.interface import PerUserPreferenceModel
from nps.models.peers.vpl import (
    VPLConfig,
    VPLEncoder,
    active_latent_units,
    kl_penalty,
    standard_normal_kl,
    training_latent,
)

POLICY_KINDS = ("np", "vpl", "btl")
REFERENCE_MODES = ("precomputed", "on_the_fly")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """NP-DPO / DPO settings. The paper (2025 code): β 0.1 (v1: 0.05), LoRA r 128 / α 256 on q, v."""

    kind: str = "np"  # "np" (NP-DPO), "vpl" (VPL-DPO) or "btl" (standard DPO)
    beta: float = 0.1
    encoder: EncoderConfig = EncoderConfig()  # NP-DPO's context encoder
    # VPL-DPO's encoder and KL (β, annealing, clamp); its reward-decoder fields are unused.
    vpl: VPLConfig = VPLConfig()
    lora: LoRAConfig = LoRAConfig(rank=8, alpha=16.0)
    # "precomputed": log π_ref read from the options table (computed once, see
    # ``with_reference_log_probs``); "on_the_fly": a second, gradient-free forward per step.
    reference: str = "precomputed"
    logits_chunk: int = 32  # sequence positions per LM-head chunk: B·32·V fp32 logits at a time
    # What each decoder block keeps for the backward pass: "none", "full" (its input alone) or
    # "dots" (its weight matmuls' outputs); see nps.lm.decoder.REMAT_POLICIES.
    remat: str = "none"

    def __post_init__(self):
        if self.kind not in POLICY_KINDS:
            raise invalid("kind", self.kind, f"is unknown; use one of {list(POLICY_KINDS)}")
        if self.reference not in REFERENCE_MODES:
            raise invalid("reference", self.reference, f"is unknown; use one of {list(REFERENCE_MODES)}")
        if self.beta <= 0:
            raise invalid("beta", self.beta, "must be positive")
        if self.remat not in REMAT_POLICIES:
            raise invalid("remat", self.remat, f"is unknown; use one of {list(REMAT_POLICIES)}")
        check_positive(self, "logits_chunk")


def policy_kind(model_name: str) -> str:
    """The kind of a trained policy from its name: "np" for NP-DPO (``np_dpo``), "vpl" for VPL-DPO
    (``vpl_dpo``), "btl" for every DPO baseline (``btl_dpo_mixed``, the per-user oracles)."""
    return next((kind for kind in ("np", "vpl") if model_name.startswith(kind + "_")), "btl")


def _flatten(tree, leading: int):
    return jax.tree.map(lambda x: x.reshape((-1, *x.shape[leading:])), tree)


class SteerablePolicy(PerUserPreferenceModel):
    """Context encoder + FiLM/LoRA decoder. Trainable: ``nnx.Param``; the base: ``BaseParam``.

    A per-user preference model (``nps.models.interface``) whose options are ``PolicyOptions``; the
    BTL-DPO baseline (``kind="btl"``) has no user state: its ``context_latent`` is None. The encoder
    is NP's ``ContextEncoder`` (``kind="np"``) or VPL's ``VPLEncoder`` (``kind="vpl"``)."""

    def __init__(self, decoder: Decoder, feature_dim: int, config: PolicyConfig, *, rngs: nnx.Rngs, mesh=None):
        """A new policy on ``decoder``'s base weights with adapters, FiLM and encoder of its own.

        The caller's decoder is left as it is: this policy holds a new module over the same
        (immutable) base arrays, so any number of policies share one copy of the base.
        """
        self.config = config
        own = nnx.merge(*nnx.split(decoder))  # a new module graph over the same arrays: nothing copied
        own.add_lora(config.lora, rngs=rngs, mesh=mesh)
        if config.kind == "np":
            latent_dim, encoder = config.encoder.latent_dim, ContextEncoder(feature_dim, config.encoder, rngs=rngs)
        elif config.kind == "vpl":
            latent_dim, encoder = config.vpl.latent_dim, VPLEncoder(feature_dim, config.vpl, rngs=rngs)
        else:
            latent_dim, encoder = None, None
        self.lm = ConditionedDecoder(own, latent_dim)
        self.encoder = nnx.data(encoder)

    @property
    def objective_reads_step(self) -> bool:
        """VPL-DPO's KL weight follows the training step (nps.train.loop passes it)."""
        return self.config.kind == "vpl"

    # -- the user's latent ------------------------------------------------------------------
    def encode(self, chosen: jax.Array, rejected: jax.Array, mask: jax.Array, key=None) -> jax.Array | None:
        """z [B, d] from context-pair features [B, C, E] (mask [B, C]); None for the BTL-DPO baseline.
        ``key`` drives NP's attention dropout; VPL-DPO's z is its posterior mean μ whatever the key
        (its training sample is drawn in ``objective``)."""
        if self.encoder is None:
            return None
        if self.config.kind == "vpl":
            return self.encoder(chosen, rejected, mask)[0]
        return self.encoder(chosen, rejected, mask, key=key)

    def encode_context(self, episodes: Episodes, key=None) -> jax.Array | None:
        return self.encode(
            episodes.context_chosen.features, episodes.context_rejected.features, episodes.context_mask, key
        )

    def context_latent(self, episodes: Episodes) -> jax.Array | None:
        """A point z per task [B, d] (the encoder is deterministic here)."""
        return self.encode_context(episodes)

    # -- log-probabilities ------------------------------------------------------------------
    def log_probs(
        self, options: PolicyOptions, z: jax.Array | None = None, *, use_lora: bool = True, dropout_key=None
    ) -> jax.Array:
        """log π(response | prompt, z) [N] for options with one leading axis N; z [N, d] or None."""
        hidden, _ = self.lm.hidden_states(
            options.tokens, options.token_mask, z=z, use_lora=use_lora, dropout_key=dropout_key,
            remat=self.config.remat,
        )
        return response_log_probs(
            self.lm.decoder.logits_function(), hidden, options.tokens, options.response_mask, self.config.logits_chunk
        )

    def reference_log_probs(self, options: PolicyOptions) -> jax.Array:
        """log π_ref [N]: the base (no LoRA, no FiLM) on the same weights; no gradient flows."""
        return jax.lax.stop_gradient(self.log_probs(options, None, use_lora=False))

    def target_log_odds(self, episodes: Episodes, z: jax.Array | None, dropout_key=None) -> jax.Array:
        """DPO log-odds [B, T] that each target's chosen response beats its rejected one, given z [B, d]."""
        batch, targets = episodes.target_mask.shape
        # Chosen and rejected of every target in one forward pass: [B, T, 2, ...] -> [B·T·2, ...].
        both = jax.tree.map(lambda c, r: jnp.stack([c, r], axis=2), episodes.target_chosen, episodes.target_rejected)
        flat = _flatten(both, 3)
        z_flat = None if z is None else jnp.repeat(z, targets * 2, axis=0)
        policy = self.log_probs(flat, z_flat, dropout_key=dropout_key).reshape(batch, targets, 2)
        if self.config.reference == "on_the_fly":
            reference = self.reference_log_probs(flat).reshape(batch, targets, 2)
        else:
            reference = both.reference_log_prob
        return dpo_log_odds(policy[..., 0], policy[..., 1], reference[..., 0], reference[..., 1], self.config.beta)

    # -- training (``predict_log_odds`` is the interface's: target_log_odds given context_latent) ----
    def objective(self, episodes: Episodes, key: jax.Array, step: jax.Array | None = None):
        """Conditional DPO loss: mean over tasks of the mean −log σ(log-odds) over target pairs;
        VPL-DPO adds β·a(step)·KL(q(z|C) ‖ N(0, I)) / N^T per task, as VPL's reward model."""
        encoder_key, dropout_key = jax.random.split(key)
        lora_dropout = dropout_key if self.config.lora.dropout > 0 else None
        if self.config.kind != "vpl":
            log_odds = self.target_log_odds(episodes, self.encode_context(episodes, encoder_key), lora_dropout)
            loss = jnp.mean(choice_nll(log_odds, episodes.target_mask))
            return loss, {"accuracy": jnp.mean(choice_accuracy(log_odds, episodes.target_mask))}
        mean, log_var = self.encoder(
            episodes.context_chosen.features, episodes.context_rejected.features, episodes.context_mask)
        log_odds = self.target_log_odds(episodes, training_latent(mean, log_var, encoder_key), lora_dropout)
        penalty = kl_penalty(mean, log_var, self.config.vpl, step, jnp.sum(episodes.target_mask, axis=-1))
        loss = jnp.mean(choice_nll(log_odds, episodes.target_mask) + penalty)
        return loss, {"accuracy": jnp.mean(choice_accuracy(log_odds, episodes.target_mask)),
                      "kl": jnp.mean(standard_normal_kl(mean, log_var)), "active_units": active_latent_units(mean)}


def with_reference_log_probs(policy: SteerablePolicy, options: PolicyOptions, batch_size: int = 64) -> PolicyOptions:
    """``options`` with ``reference_log_prob`` filled by the base model, computed once in batches."""
    graphdef, state = nnx.split(policy)
    mesh = mesh_of(state)
    count = options.tokens.shape[0]
    pad = -count % batch_size
    padded = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]), options)
    values = [
        _reference_log_probs(graphdef, state, jax.tree.map(lambda x: x[start : start + batch_size], padded), mesh)
        for start in range(0, count + pad, batch_size)
    ]
    return options._replace(reference_log_prob=jnp.concatenate(values)[:count])


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _reference_log_probs(graphdef, state, batch: PolicyOptions, mesh=None) -> jax.Array:
    """log π_ref [N] of a batch of options, each device its sequences on the weights' ``mesh``."""
    with on_mesh(mesh):
        batch = jax.tree.map(lambda x: constrain(x, ("activation_batch", *(None,) * (x.ndim - 1))), batch)
        return constrain(nnx.merge(graphdef, state).reference_log_probs(batch), (None,))  # on every device
