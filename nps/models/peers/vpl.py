"""VPL, variational preference learning (Poddar et al., NeurIPS 2024), as its LLM release implements it.

    context pairs [chosen ‖ rejected] --pair MLP--> h_j --one-head attention, mean over j--> (μ, log σ²)
    training: z = (μ + σε) projected onto the sphere of radius √d;  evaluation: z = μ
    r(y | z) = MLP([y ‖ z]);  loss = −log σ(r_c − r_r) + β·a(t)·KL(q(z|C) ‖ N(0, I)) / N^T

μ and log σ² are clamped to [−1, 1] before anything (the KL included) reads them, as in the release.
a(t) is the release's cyclical cosine annealing of the KL weight from ``kl_anneal_floor`` up to 1 over
``kl_anneal_period`` training steps. The release never sees an empty context (its attention over an
empty set is undefined); here q(z | ∅) is the prior N(0, I), so z = 0 at evaluation and the KL is 0.
Every deviation from the release: docs/peers.md.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nps.config import check_positive
from nps.data.episodes import Episodes
from nps.errors import invalid
from nps.layers import DeepMLP, activation_fn
from nps.likelihood import choice_nll
from nps.models.interface import PerUserRewardModel
from nps.models.reward import accuracy_aux

# SPL's definition of an active latent unit: its posterior mean varies across users in a batch.
ACTIVE_UNIT_VARIANCE = 0.005


@dataclasses.dataclass(frozen=True)
class VPLConfig:
    """VPL's release defaults: widths 512, LeakyReLU(0.2), β = 1e-4 with cyclical cosine annealing
    from 0.1 over 10⁴ steps (the Pets script; UF-P-2 uses β = 0, UF-P-4 β = 3e-6)."""

    kind: str = "vpl"
    hidden_dim: int = 512
    latent_dim: int = 512
    activation: str = "leaky_relu"
    kl_weight: float = 1e-4  # β
    kl_anneal_period: int = 10_000
    kl_anneal_floor: float = 0.1
    clamp: float = 1.0  # μ and log σ² are clamped to [−clamp, clamp]

    def __post_init__(self):
        if self.kind != "vpl":
            raise invalid("kind", self.kind, "must be 'vpl' for a VPLConfig")
        check_positive(self, "hidden_dim", "latent_dim", "kl_anneal_period")
        activation_fn(self.activation)
        if self.kl_weight < 0:
            raise invalid("kl_weight", self.kl_weight, "must be non-negative")
        if not 0.0 <= self.kl_anneal_floor <= 1.0:
            raise invalid("kl_anneal_floor", self.kl_anneal_floor, "must be in [0, 1]")
        if self.clamp <= 0:
            raise invalid("clamp", self.clamp, "must be positive")


def kl_annealing(step: jax.Array, period: int, floor: float) -> jax.Array:
    """The release's cyclical cosine weight: floor + (1 − floor)·(cos(π(t/P − 1)) + 1)/2 with t = step mod P
    (``floor`` at the start of each cycle, rising to 1 at its end)."""
    t = jnp.mod(jnp.asarray(step, jnp.float32), period) / period
    return floor + (1.0 - floor) * (jnp.cos(jnp.pi * (t - 1.0)) + 1.0) / 2.0


def standard_normal_kl(mean: jax.Array, log_var: jax.Array) -> jax.Array:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = −½ Σ (1 + log σ² − μ² − σ²): ``[..., d] -> [...]``."""
    return -0.5 * jnp.sum(1.0 + log_var - jnp.square(mean) - jnp.exp(log_var), axis=-1)


def sphere_projection(z: jax.Array) -> jax.Array:
    """z / ‖z‖ · √d: ``[..., d] -> [..., d]`` (a zero vector stays zero)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(z), axis=-1, keepdims=True))
    return z / jnp.maximum(norm, jnp.finfo(z.dtype).tiny) * jnp.sqrt(jnp.asarray(z.shape[-1], z.dtype))


def active_latent_units(mean: jax.Array, threshold: float = ACTIVE_UNIT_VARIANCE) -> jax.Array:
    """The fraction of latent dimensions whose posterior mean varies across a batch of users
    (Var_batch(μ_i) > threshold, SPL's active units): ``[B, d] -> []``."""
    return jnp.mean(jnp.var(mean, axis=0) > threshold)


class VPLEncoder(nnx.Module):
    """VPL's posterior q(z | C) over context pairs of option features ``[B, C, D]``: the pair MLP,
    one-head attention, the mean over the context and the (μ, log σ²) heads. Shared by VPL's reward
    model and VPL-DPO (``nps.models.policy``), which conditions FiLM on its z in place of NP's."""

    def __init__(self, option_dim: int, config: VPLConfig, *, rngs: nnx.Rngs):
        h, d = config.hidden_dim, config.latent_dim
        self.clamp = config.clamp
        self.pair_encoder = DeepMLP((2 * option_dim, h, h, d), config.activation, rngs=rngs)
        # W_q, W_k, W_v (d × d with biases) as one matmul
        self.query_key_value = nnx.Linear(d, 3 * d, rngs=rngs)
        self.mean_head = nnx.Linear(d, d, rngs=rngs)
        self.log_var_head = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, chosen: jax.Array, rejected: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Clamped (μ, log σ²), each ``[B, d]``, of context pairs ``[B, C, D]`` where ``mask [B, C]``;
        the prior (0, 0) for an empty context."""
        pairs = jnp.concatenate([chosen, rejected], axis=-1)
        h = self.pair_encoder(jnp.where(mask[..., None], pairs, 0.0))  # [B, C, d]
        query, key, value = jnp.split(self.query_key_value(h), 3, axis=-1)
        logits = jnp.einsum("bqd,bkd->bqk", query, key) / jnp.sqrt(jnp.asarray(h.shape[-1], h.dtype))
        weights = jax.nn.softmax(jnp.where(mask[:, None, :], logits, jnp.finfo(logits.dtype).min), axis=-1)
        attended = jnp.einsum("bqk,bkd->bqd", weights, value)
        count = jnp.sum(mask, axis=-1, keepdims=True)
        pooled = jnp.sum(jnp.where(mask[..., None], attended, 0.0), axis=1) / jnp.maximum(count, 1).astype(h.dtype)
        empty = count == 0
        mean = jnp.where(empty, 0.0, jnp.clip(self.mean_head(pooled), -self.clamp, self.clamp))
        log_var = jnp.where(empty, 0.0, jnp.clip(self.log_var_head(pooled), -self.clamp, self.clamp))
        return mean, log_var


def training_latent(mean: jax.Array, log_var: jax.Array, key: jax.Array) -> jax.Array:
    """VPL's z in training: a sample of N(μ, σ²) projected onto the sphere of radius √d, ``[B, d]``."""
    noise = jax.random.normal(key, mean.shape, mean.dtype)
    return sphere_projection(mean + jnp.exp(0.5 * log_var) * noise)


def kl_penalty(mean: jax.Array, log_var: jax.Array, config: VPLConfig, step: jax.Array | None,
               num_targets: jax.Array) -> jax.Array:
    """β·a(step)·KL(q(z|C) ‖ N(0, I)) / N^T per task ``[B]`` (a(step) = 1 when no step is given)."""
    anneal = 1.0 if step is None else kl_annealing(step, config.kl_anneal_period, config.kl_anneal_floor)
    return config.kl_weight * anneal * standard_normal_kl(mean, log_var) / jnp.maximum(num_targets, 1)


class VPLReward(PerUserRewardModel):
    """VPL's reward model over option features ``[..., D]`` (see the module docstring)."""

    objective_reads_step = True  # the KL annealing follows the training step (nps.train.loop)

    def __init__(self, option_dim: int, config: VPLConfig, *, rngs: nnx.Rngs):
        h, d = config.hidden_dim, config.latent_dim
        self.config = config
        self.encoder = VPLEncoder(option_dim, config, rngs=rngs)
        self.decoder = DeepMLP((option_dim + d, h, h, 1), config.activation, rngs=rngs)
        self.option_dim = option_dim

    def posterior(self, episodes: Episodes) -> tuple[jax.Array, jax.Array]:
        """q(z | C): clamped (μ, log σ²), each ``[B, d]``; the prior (0, 0) for an empty context."""
        return self.encoder(episodes.context_chosen, episodes.context_rejected, episodes.context_mask)

    def reward(self, options: jax.Array, z: jax.Array) -> jax.Array:
        """r(y | z) = MLP([y ‖ z]): ``options [B, N, D]``, ``z [B, d]`` -> ``[B, N]``.

        The first layer is applied as W_y·y + W_z·z, the z half once per user (the same function)."""
        first = self.decoder.layers[0]
        kernel = first.kernel[...]
        pre = options @ kernel[: self.option_dim] + (z @ kernel[self.option_dim :])[:, None, :] + first.bias[...]
        x = self.decoder.activation(pre)
        for layer in self.decoder.layers[1:-1]:
            x = self.decoder.activation(layer(x))
        return self.decoder.layers[-1](x)[..., 0]

    def context_latent(self, episodes: Episodes) -> jax.Array:
        """z = μ (the release's evaluation latent, not projected): ``[B, d]``."""
        return self.posterior(episodes)[0]

    def predict_log_odds(self, episodes: Episodes, key: jax.Array | None = None) -> jax.Array:
        return self.target_log_odds(episodes, self.context_latent(episodes))

    def objective(self, episodes: Episodes, key: jax.Array, step: jax.Array | None = None):
        """Target NLL with z ~ q(z|C) projected onto the sphere, plus β·a(step)·KL / N^T per task
        (a(step) = 1 when no step is given)."""
        mean, log_var = self.posterior(episodes)
        log_odds = self.target_log_odds(episodes, training_latent(mean, log_var, key))
        nll = choice_nll(log_odds, episodes.target_mask)
        loss = jnp.mean(nll + kl_penalty(mean, log_var, self.config, step, jnp.sum(episodes.target_mask, axis=-1)))
        return loss, accuracy_aux(log_odds, episodes) | {"kl": jnp.mean(standard_normal_kl(mean, log_var)),
                                                          "active_units": active_latent_units(mean)}
