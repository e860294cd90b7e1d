"""GPO, group preference optimisation (Zhao, Dang and Grover, ICLR 2024), as its release implements it,
with each preference pair as a two-option question.

    context pair (c, r) -> tokens E([x_c ‖ 1]), E([x_r ‖ 0]);  target pair -> E([x_c ‖ 0]), E([x_r ‖ 0])
    a post-LN transformer without positions, whose every row attends to the context tokens only
    head(target token) -> (m, s);  p = softmax(m_c, m_r) within the pair;  y = (1, 0) for (chosen, rejected)
    loss: the Gaussian NLL of y under N(p, exp(s)²), summed over a task's targets (or BCE, a labelled variant)

softmax(m_c, m_r)_c = σ(m_c − m_r): the predicted log-odds are m_c − m_r, BTL with the reward m. Targets
never see each other (each is scored from the context and its own features alone), and without positions
the context is a set. The release's mask leaves an empty context undefined (every row masked); here an
empty context is one learned null token, which no row sees once the context has a pair.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nps.config import check_positive
from nps.data.episodes import Episodes
from nps.encoder import MaskedSelfAttention
from nps.errors import invalid
from nps.layers import MLP, DeepMLP
from nps.likelihood import btl_log_odds, choice_nll
from nps.models.interface import PreferenceModel
from nps.models.reward import accuracy_aux

GPO_LOSSES = ("gaussian_nll", "bce")


@dataclasses.dataclass(frozen=True)
class GPOConfig:
    """GPO's release defaults (configs/gpo.yaml): a four-layer ReLU embedder of width 128, six post-LN
    layers of width 128 with 4 heads and a feed-forward width of 128, no dropout; the Gaussian NLL."""

    kind: str = "gpo"
    model_dim: int = 128
    embedder_layers: int = 4
    num_layers: int = 6
    num_heads: int = 4
    feedforward_dim: int = 128
    loss: str = "gaussian_nll"  # or "bce": −log σ(m_c − m_r), nps's choice likelihood

    def __post_init__(self):
        if self.kind != "gpo":
            raise invalid("kind", self.kind, "must be 'gpo' for a GPOConfig")
        check_positive(self, "model_dim", "embedder_layers", "num_layers", "num_heads", "feedforward_dim")
        if self.model_dim % self.num_heads:
            raise invalid("model_dim", self.model_dim, f"must be divisible by num_heads={self.num_heads}")
        if self.loss not in GPO_LOSSES:
            raise invalid("loss", self.loss, f"is unknown; use one of {list(GPO_LOSSES)}")


def gpo_key_mask(context_mask: jax.Array, num_targets: int) -> jax.Array:
    """Which tokens every row may attend to, ``[B, C] -> [B, 1 + 2C + 2T]`` over the sequence
    [null, context chosen ×C, context rejected ×C, target chosen ×T, target rejected ×T]: the real
    context tokens, or the null token alone when the context is empty; never a target."""
    empty = ~jnp.any(context_mask, axis=-1, keepdims=True)
    targets = jnp.zeros((context_mask.shape[0], 2 * num_targets), bool)
    return jnp.concatenate([empty, context_mask, context_mask, targets], axis=-1)


class PostNormLayer(nnx.Module):
    """x ← LN(x + attention(x)); x ← LN(x + FFN(x)) (PyTorch's TransformerEncoderLayer, post-LN, ReLU)."""

    def __init__(self, dim: int, num_heads: int, feedforward_dim: int, *, rngs: nnx.Rngs):
        self.attention = MaskedSelfAttention(dim, num_heads, 0.0, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.feedforward = MLP(dim, feedforward_dim, dim, "relu", rngs=rngs)
        self.feedforward_norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """``[B, L, H], [B, L] -> [B, L, H]``."""
        x = self.attention_norm(x + self.attention(x, key_mask, None))
        return self.feedforward_norm(x + self.feedforward(x))


class GPOReward(PreferenceModel):
    """GPO over option features ``[..., D]`` (see the module docstring). No per-user latent: the
    context acts through every layer, so GPO scores targets only together with a context."""

    def __init__(self, option_dim: int, config: GPOConfig, *, rngs: nnx.Rngs):
        d = config.model_dim
        self.config = config
        self.embedder = DeepMLP((option_dim + 1, *(d,) * config.embedder_layers), "relu", rngs=rngs)
        self.null_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d,)))
        self.layers = nnx.List([PostNormLayer(d, config.num_heads, config.feedforward_dim, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.head = MLP(d, d, 2, "relu", rngs=rngs)

    def _embed(self, options: jax.Array, label: float) -> jax.Array:
        """E([x ‖ y]) for options ``[B, N, D]`` and one label y: ``[B, N, H]``."""
        y = jnp.full((*options.shape[:-1], 1), label, options.dtype)
        return self.embedder(jnp.concatenate([options, y], axis=-1))

    def target_outputs(self, episodes: Episodes) -> tuple[jax.Array, jax.Array]:
        """The head's (m, s) for every target option: each ``[B, T, 2]`` (chosen, rejected)."""
        mask = episodes.context_mask
        batch, capacity = mask.shape
        num_targets = episodes.target_chosen.shape[1]
        context_chosen = jnp.where(mask[..., None], episodes.context_chosen, 0.0)
        context_rejected = jnp.where(mask[..., None], episodes.context_rejected, 0.0)
        null = jnp.broadcast_to(self.null_token[...], (batch, 1, self.config.model_dim))
        tokens = jnp.concatenate([
            null,
            self._embed(context_chosen, 1.0),
            self._embed(context_rejected, 0.0),
            self._embed(episodes.target_chosen, 0.0),
            self._embed(episodes.target_rejected, 0.0),
        ], axis=1)
        key_mask = gpo_key_mask(mask, num_targets)
        for layer in self.layers:
            tokens = layer(tokens, key_mask)
        targets = tokens[:, 1 + 2 * capacity :].reshape(batch, 2, num_targets, -1)
        out = self.head(targets)  # [B, 2, T, 2]
        return jnp.moveaxis(out[..., 0], 1, -1), jnp.moveaxis(out[..., 1], 1, -1)

    def predict_log_odds(self, episodes: Episodes, key: jax.Array | None = None) -> jax.Array:
        means, _ = self.target_outputs(episodes)
        return btl_log_odds(means[..., 0], means[..., 1])

    def objective(self, episodes: Episodes, key: jax.Array):
        means, log_stds = self.target_outputs(episodes)
        log_odds = btl_log_odds(means[..., 0], means[..., 1])
        if self.config.loss == "bce":
            return jnp.mean(choice_nll(log_odds, episodes.target_mask)), accuracy_aux(log_odds, episodes)
        loss = jnp.mean(jnp.sum(gaussian_nll_of_choices(means, log_stds) * episodes.target_mask, axis=-1))
        return loss, accuracy_aux(log_odds, episodes)


def gaussian_nll_of_choices(means: jax.Array, log_stds: jax.Array) -> jax.Array:
    """GPO's loss per pair: −log N(y; softmax(m), exp(s)²) summed over the pair's two options, with
    y = (1, 0) for (chosen, rejected). ``means, log_stds [..., 2] -> [...]``."""
    probabilities = jax.nn.softmax(means, axis=-1)
    targets = jnp.array([1.0, 0.0], means.dtype)
    squared = jnp.square((targets - probabilities) * jnp.exp(-log_stds))
    return jnp.sum(0.5 * squared + log_stds + 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)
