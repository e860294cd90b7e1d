"""Reward models over option features: BTL, DPL and NP-BTL (paper §2, §4).

All three are preference models (``nps.models.interface``): BTL and DPL ignore the context;
NP-BTL is a per-user one, a reward decoder conditioned on z(C).
The released code's decoder uses BatchNorm; nps does not, because batch
statistics would mix different users inside a batch (and make evaluation depend
on the batch).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nps.config import check_positive
from nps.data.episodes import Episodes
from nps.encoder import ContextEncoder, EncoderConfig
from nps.errors import invalid
from nps.latent import MIN_STD, gaussian_kl
from nps.layers import MLP, activation_fn, compose_mlps
from nps.likelihood import (
    btl_log_odds,
    choice_accuracy,
    choice_nll,
    dpl_log_odds,
    posterior_predictive_log_odds,
)
from nps.models.interface import PerUserRewardModel, PreferenceModel

MODEL_KINDS = ("btl", "dpl", "np")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """One reward model. ``kind``: "btl", "dpl" or "np" (NP-BTL)."""

    kind: str = "np"
    hidden_dim: int = 256
    activation: str = "relu"
    # NP-BTL: per-option LayerNorm in the decoder's hidden layer, standing in for the released
    # code's BatchNorm there without mixing users across the batch.
    decoder_layer_norm: bool = True
    encoder: EncoderConfig = EncoderConfig()
    # Variational NP-BTL only (encoder.stochastic = True):
    kl_weight: float = 1.0  # β in NLL + β·KL(q(z|T) ‖ q(z|C))
    train_latent_samples: int = 1
    eval_latent_samples: int = 32

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise invalid("kind", self.kind, f"is unknown; use one of {list(MODEL_KINDS)}")
        check_positive(self, "hidden_dim", "train_latent_samples", "eval_latent_samples")
        activation_fn(self.activation)
        if self.kl_weight < 0:
            raise invalid("kl_weight", self.kl_weight, "must be non-negative")


def accuracy_aux(log_odds: jax.Array, episodes: Episodes) -> dict[str, jax.Array]:
    return {"accuracy": jnp.mean(choice_accuracy(log_odds, episodes.target_mask))}


class BTLReward(PreferenceModel):
    """Homogeneous BTL: r(y) = MLP₂(MLP₁(y)), one reward for every user."""

    def __init__(self, option_dim: int, config: RewardModelConfig, *, rngs: nnx.Rngs):
        h = config.hidden_dim
        self.target_encoder = MLP(option_dim, h, h, config.activation, rngs=rngs)
        self.head = MLP(h, h, 1, config.activation, rngs=rngs)

    def reward(self, options: jax.Array) -> jax.Array:
        """``[..., D] -> [...]``."""
        return compose_mlps(self.target_encoder, self.head, options)[..., 0]

    def predict_log_odds(self, episodes: Episodes, key: jax.Array | None = None) -> jax.Array:
        return btl_log_odds(self.reward(episodes.target_chosen), self.reward(episodes.target_rejected))

    def objective(self, episodes: Episodes, key: jax.Array):
        log_odds = self.predict_log_odds(episodes)
        return jnp.mean(choice_nll(log_odds, episodes.target_mask)), accuracy_aux(log_odds, episodes)


class DPLReward(PreferenceModel):
    """DPL mean-variance (Siththaranjan et al., 2024): r(y) ~ N(μ(y), σ(y)²)."""

    def __init__(self, option_dim: int, config: RewardModelConfig, *, rngs: nnx.Rngs):
        h = config.hidden_dim
        self.target_encoder = MLP(option_dim, h, h, config.activation, rngs=rngs)
        self.head = MLP(h, h, 2, config.activation, rngs=rngs)

    def reward_distribution(self, options: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[..., D] -> (mean [...], std [...])``."""
        out = compose_mlps(self.target_encoder, self.head, options)
        return out[..., 0], MIN_STD + jax.nn.softplus(out[..., 1])

    def predict_log_odds(self, episodes: Episodes, key: jax.Array | None = None) -> jax.Array:
        return dpl_log_odds(
            *self.reward_distribution(episodes.target_chosen),
            *self.reward_distribution(episodes.target_rejected),
        )

    def objective(self, episodes: Episodes, key: jax.Array):
        log_odds = self.predict_log_odds(episodes)
        return jnp.mean(choice_nll(log_odds, episodes.target_mask)), accuracy_aux(log_odds, episodes)


class NPReward(PerUserRewardModel):
    """NP-BTL: r(y | C) = MLP₂(MLP₁(y) ‖ z(C)) (paper Eq. 4, App. C).

    Deterministic encoder: loss = target NLL given z(C) (the paper).
    Stochastic encoder: loss = E_{z~q(z|T)}[NLL] + β·KL(q(z|T) ‖ q(z|C)) / N^T, the
    usual NP ELBO per target pair (the released code has the KL reversed);
    prediction averages p(chosen ≻ rejected | z) over z ~ q(z|C).
    """

    def __init__(self, option_dim: int, config: RewardModelConfig, *, rngs: nnx.Rngs):
        h = config.hidden_dim
        self.config = config
        self.context_encoder = ContextEncoder(option_dim, config.encoder, rngs=rngs)
        self.target_encoder = MLP(option_dim, h, h, config.activation, rngs=rngs)
        # The decoder MLP₂(e ‖ z) with its first layer split as W_e·e + W_z·z: the same
        # function, but the z half runs once per task instead of once per option.
        self.decoder = MLP(h, h, 1, config.activation, layer_norm=config.decoder_layer_norm, rngs=rngs)
        self.decoder_latent = nnx.Linear(config.encoder.latent_dim, h, use_bias=False, rngs=rngs)

    @property
    def stochastic(self) -> bool:
        return self.config.encoder.stochastic

    def reward(self, options: jax.Array, z: jax.Array) -> jax.Array:
        """``options [..., N, D]``, ``z [..., d]`` -> rewards ``[..., N]``."""
        shift = self.decoder_latent(z)[..., None, :]
        return compose_mlps(self.target_encoder, self.decoder, options, shift)[..., 0]

    def encode(self, chosen, rejected, mask, key: jax.Array | None = None):
        """z ``[B, d]`` or q(z | pairs) for a batch of pair sets (see ``ContextEncoder``)."""
        return self.context_encoder(chosen, rejected, mask, key=key)

    def encode_context(self, episodes: Episodes, key: jax.Array | None = None):
        return self.encode(episodes.context_chosen, episodes.context_rejected, episodes.context_mask, key)

    def context_latent(self, episodes: Episodes) -> jax.Array:
        """A point z per task ``[B, d]``: z(C), or the mean of q(z | C)."""
        encoded = self.encode_context(episodes)
        return encoded.mean if self.stochastic else encoded

    def predict_log_odds(self, episodes: Episodes, key: jax.Array | None = None) -> jax.Array:
        if not self.stochastic:
            return self.target_log_odds(episodes, self.encode_context(episodes))
        if key is None:
            raise ValueError("the variational NP-BTL samples z ~ q(z | C) to predict: pass a PRNG key")
        q_context = self.encode_context(episodes)
        z = q_context.sample(key, self.config.eval_latent_samples)  # [S, B, d]
        sample_log_odds = jax.vmap(lambda zs: self.target_log_odds(episodes, zs))(z)
        return posterior_predictive_log_odds(sample_log_odds, axis=0)

    def objective(self, episodes: Episodes, key: jax.Array):
        key_context, key_targets, key_z = jax.random.split(key, 3)
        if not self.stochastic:
            log_odds = self.target_log_odds(episodes, self.encode_context(episodes, key_context))
            return jnp.mean(choice_nll(log_odds, episodes.target_mask)), accuracy_aux(log_odds, episodes)
        q_context = self.encode_context(episodes, key_context)
        q_targets = self.encode(
            episodes.target_chosen, episodes.target_rejected, episodes.target_mask, key_targets
        )
        z = q_targets.sample(key_z, self.config.train_latent_samples)
        sample_log_odds = jax.vmap(lambda zs: self.target_log_odds(episodes, zs))(z)  # [S, B, T]
        nll = jnp.mean(jax.vmap(lambda m: choice_nll(m, episodes.target_mask))(sample_log_odds), axis=0)
        num_targets = jnp.maximum(jnp.sum(episodes.target_mask, axis=-1), 1)
        kl = gaussian_kl(q_targets, q_context)
        loss = jnp.mean(nll + self.config.kl_weight * kl / num_targets)
        aux = accuracy_aux(jnp.mean(sample_log_odds, axis=0), episodes) | {"kl": jnp.mean(kl)}
        return loss, aux


# The paper's configurations (reward models, App. C):
# synthetic tasks: the released synthetic config (MLP inner map, self-attention, sum) without attention
# dropout, which slowed learning within the 1,000 steps (docs/design.md);
SYNTHETIC_NP_BTL = RewardModelConfig(kind="np", encoder=EncoderConfig(inner="mlp", attention_dropout=0.0))
# UltraFeedback: a linear inner map, 8-head self-attention, sum pooling, deterministic z of 256.
UF_NP_BTL = RewardModelConfig(kind="np", encoder=EncoderConfig(inner="linear"))


REWARD_MODELS = {"btl": BTLReward, "dpl": DPLReward, "np": NPReward}


def reward_model_class(kind: str) -> type[PreferenceModel]:
    """The model class of ``kind``: nps's own (``REWARD_MODELS``) or a peer method's (``nps.models.peers``)."""
    if kind in REWARD_MODELS:
        return REWARD_MODELS[kind]
    from nps.models.peers import PEER_MODELS  # the peers build on this module

    return PEER_MODELS[kind][1]


def build_reward_model(option_dim: int, config, seed: int) -> PreferenceModel:
    """Construct the model named by ``config.kind`` (a ``RewardModelConfig`` or a peer's config, e.g.
    ``VPLConfig``) with parameters drawn from ``seed``."""
    model_class = reward_model_class(config.kind)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_class(option_dim, config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, _initial_parameters(option_dim, config, jax.random.key(seed)))


# Initialised under one jit (eagerly, every initialiser would compile its own tiny program), with the
# seed's key as an argument: models of one configuration compile their initialisation once.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _initial_parameters(option_dim: int, config: RewardModelConfig, key: jax.Array):
    return nnx.split(reward_model_class(config.kind)(option_dim, config, rngs=nnx.Rngs(key)))[1]
