"""Neural-process context encoder: a user's context pairs -> z (or q(z | C)).

    pair features [chosen ‖ rejected] --inner map--> h_j --(self-attention)--> pool over j --outer MLP--> z

The context size is a boolean mask over a fixed capacity C, so one compiled
function serves every N^C = 0..C. Masked slots are zeroed before anything
reads them (junk, even NaN, in padding changes nothing), pooling divides by
max(count, 1), and the empty context therefore maps to a learned constant:
the prior z (or prior q(z | ∅)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nps.config import check_positive
from nps.errors import invalid
from nps.latent import DiagonalGaussian
from nps.layers import MLP, activation_fn

INNER_MAPS = ("linear", "mlp")
AGGREGATIONS = ("mean", "sum", "attention")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Context-encoder hyperparameters (defaults: the paper's App. C; hidden and latent 256)."""

    hidden_dim: int = 256
    latent_dim: int = 256
    inner: str = "mlp"  # "linear" (UltraFeedback configs) or "mlp" (synthetic)
    # "mean" (Eq. 5), "sum", or "attention": self-attention then sum (App. C.2 and the released configs).
    aggregation: str = "attention"
    num_heads: int = 8
    attention_dropout: float = 0.1
    activation: str = "relu"
    # LayerNorm in the inner and outer MLPs' hidden layers, per example so users never mix.
    # Not in the paper; with it NP-BTL reaches the released code's accuracy in its 1,000 steps.
    layer_norm: bool = True
    stochastic: bool = False  # False: deterministic z (the paper); True: q(z|C) = N(μ, diag σ²)

    def __post_init__(self):
        if self.inner not in INNER_MAPS:
            raise invalid("inner", self.inner, f"is unknown; use one of {list(INNER_MAPS)}")
        if self.aggregation not in AGGREGATIONS:
            raise invalid("aggregation", self.aggregation, f"is unknown; use one of {list(AGGREGATIONS)}")
        check_positive(self, "hidden_dim", "latent_dim", "num_heads")
        if self.aggregation == "attention" and self.hidden_dim % self.num_heads:
            raise invalid("hidden_dim", self.hidden_dim, f"must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise invalid("attention_dropout", self.attention_dropout, "must be in [0, 1)")
        activation_fn(self.activation)


class MaskedSelfAttention(nnx.Module):
    """Multi-head self-attention over the context set; padded keys get zero weight.

    ``[B, C, H], [B, C] -> [B, C, H]``. No positional information, so the map is
    permutation-equivariant and the pooled result permutation-invariant.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)  # one matmul for queries, keys and values
        self.out = nnx.Linear(dim, dim, rngs=rngs)

    def mix(self, x: jax.Array, mask: jax.Array, key: jax.Array | None) -> jax.Array:
        """Attention-weighted values before the output projection: ``[B, C, H] -> [B, C, H]``."""
        *batch, length, dim = x.shape
        head_dim = dim // self.num_heads

        def heads(t):
            return t.reshape(*batch, length, self.num_heads, head_dim)

        q, k, v = (heads(t) for t in jnp.split(self.qkv(x), 3, axis=-1))
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        key_mask = mask[..., None, None, :]
        # finfo.min, not -inf: an all-padding row stays finite (its output is pooled away).
        logits = jnp.where(key_mask, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        if key is not None and self.dropout > 0.0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, weights.shape)
            weights = jnp.where(keep, weights / (1.0 - self.dropout), 0.0)
        return jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*batch, length, dim)

    def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None) -> jax.Array:
        """Per-slot outputs ``[B, C, H]``."""
        return self.out(self.mix(x, mask, key))

    def pooled(self, x: jax.Array, mask: jax.Array, key: jax.Array | None) -> jax.Array:
        """Σ over real slots of ``self(x)``: ``[B, C, H] -> [B, H]``.

        The output projection is linear, so it is applied once to the pooled mix,
        Σ_j (a_j W + b) = (Σ_j a_j) W + N·b, rather than to every slot.
        """
        mixed = jnp.sum(jnp.where(mask[..., None], self.mix(x, mask, key), 0.0), axis=-2)
        count = jnp.sum(mask, axis=-1, keepdims=True).astype(x.dtype)
        return mixed @ self.out.kernel[...] + count * self.out.bias[...]


class ContextEncoder(nnx.Module):
    """Deep-set encoder of preference pairs (paper Eq. 5 and App. C.2.1, Eq. 21)."""

    def __init__(self, option_dim: int, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        pair_dim, hidden = 2 * option_dim, config.hidden_dim
        if config.inner == "linear":
            self.inner = nnx.Linear(pair_dim, hidden, rngs=rngs)
        else:
            self.inner = MLP(pair_dim, hidden, hidden, config.activation, layer_norm=config.layer_norm, rngs=rngs)
        self.attention = (
            MaskedSelfAttention(hidden, config.num_heads, config.attention_dropout, rngs=rngs)
            if config.aggregation == "attention"
            else None
        )
        out_dim = 2 * config.latent_dim if config.stochastic else config.latent_dim
        self.outer = MLP(hidden, hidden, out_dim, config.activation, layer_norm=config.layer_norm, rngs=rngs)

    def __call__(
        self,
        chosen: jax.Array,
        rejected: jax.Array,
        mask: jax.Array,
        *,
        key: jax.Array | None = None,
    ) -> jax.Array | DiagonalGaussian:
        """Encode a batch of context sets.

        Args:
          chosen, rejected: ``[B, C, D]`` option features, ordered by the user's choice.
          mask: ``[B, C]`` bool, True for real pairs; any row may be all False (N^C = 0).
          key: PRNG key for attention dropout; None evaluates deterministically.

        Returns:
          z ``[B, latent_dim]``, or ``DiagonalGaussian`` with ``[B, latent_dim]`` leaves.
        """
        pairs = jnp.concatenate([chosen, rejected], axis=-1)
        pairs = jnp.where(mask[..., None], pairs, 0.0)
        h = self.inner(pairs)
        if self.attention is not None:
            pooled = self.attention.pooled(h, mask, key)
        else:
            pooled = jnp.sum(jnp.where(mask[..., None], h, 0.0), axis=-2)
        if self.config.aggregation == "mean":
            pooled = pooled / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1).astype(h.dtype)
        out = self.outer(pooled)
        if not self.config.stochastic:
            return out
        mean, raw_std = jnp.split(out, 2, axis=-1)
        return DiagonalGaussian.from_raw(mean, raw_std)
