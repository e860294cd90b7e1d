"""FiLM conditioning of a decoder on a user latent z (paper §3.3, Eq. 23).

A hypernetwork maps z ∈ R^{d_z} to (γ_m, β_m) ∈ R^D for every block m, and each
block's output h becomes γ_m·h + β_m. As in the authors' 2025 code each map is one
linear layer whose weights start at 0, with γ's bias 1 and β's bias 0: at
initialisation the conditioned model *is* the base model, for every z.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nps.lm.decoder import Decoder


class FiLM(nnx.Module):
    """z [B, d_z] -> (γ, β), each [B, L, D] (fp32); identity at initialisation."""

    def __init__(self, latent_dim: int, num_layers: int, hidden_size: int):
        shape = (latent_dim, num_layers, hidden_size)
        # Logical axes as the decoder's weights (nps.lm.sharding): split with the model dimension.
        kernel, bias = (None, "layers", "embed"), ("layers", "embed")
        self.gamma_kernel = nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=kernel, eager_sharding=False)
        self.gamma_bias = nnx.Param(jnp.ones(shape[1:], jnp.float32), out_sharding=bias, eager_sharding=False)
        self.beta_kernel = nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=kernel, eager_sharding=False)
        self.beta_bias = nnx.Param(jnp.zeros(shape[1:], jnp.float32), out_sharding=bias, eager_sharding=False)

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        gamma = jnp.einsum("bz,zld->bld", z, self.gamma_kernel[...]) + self.gamma_bias[...]
        beta = jnp.einsum("bz,zld->bld", z, self.beta_kernel[...]) + self.beta_bias[...]
        return gamma, beta


class ConditionedDecoder(nnx.Module):
    """A decoder whose every block output is modulated by FiLM(z); z = None is the base model.

    The trainable parts (FiLM, LoRA) are ``nnx.Param``; the decoder's pretrained
    weights are ``BaseParam``: ``nnx.split(model, BaseParam, nnx.Param)`` separates
    the frozen base from what an optimiser updates. The DPO reference is
    ``model(..., z=None, use_lora=False)``: the same weights, nothing copied.
    """

    def __init__(self, decoder: Decoder, latent_dim: int | None):
        self.decoder = decoder
        self.latent_dim = latent_dim
        film = None if latent_dim is None else FiLM(latent_dim, decoder.config.num_layers, decoder.config.hidden_size)
        self.film = nnx.data(film)

    def modulation(self, z: jax.Array | None) -> tuple[jax.Array, jax.Array] | None:
        """(γ, β) [B, L, D] in the decoder's dtype for per-example z [B, d_z], or None for z = None.

        With ``latent_dim=None`` the decoder is unconditioned (standard DPO) and z must be None.
        """
        if z is None:
            return None
        if self.film is None:
            raise ValueError("this decoder has no FiLM (latent_dim=None); pass z=None")
        gamma, beta = self.film(z.astype(jnp.float32))
        return gamma.astype(self.decoder.dtype), beta.astype(self.decoder.dtype)

    def hidden_states(self, tokens, token_mask=None, *, z=None, **kwargs):
        """Final hidden states [B, T, D] and cache; see ``Decoder.hidden_states``."""
        return self.decoder.hidden_states(tokens, token_mask, film=self.modulation(z), **kwargs)

    def __call__(self, tokens, token_mask=None, *, z=None, **kwargs) -> jax.Array:
        """Logits [B, T, V]; z [B, d_z] or None; ``use_lora=False`` with z=None is the reference."""
        hidden, _ = self.hidden_states(tokens, token_mask, z=z, **kwargs)
        return self.decoder.logits(hidden)
