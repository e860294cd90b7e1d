"""Diagonal Gaussian latents q(z | ·): parameterisation, reparameterised samples, KL."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Keeps σ away from 0 so that log σ and the KL stay finite however the encoder drifts.
MIN_STD = 1e-4


class DiagonalGaussian(NamedTuple):
    """N(mean, diag(std²)); a pytree, so it crosses jit boundaries as is.

    mean, std: ``[..., d]``.
    """

    mean: jax.Array
    std: jax.Array

    @classmethod
    def from_raw(cls, mean: jax.Array, raw_std: jax.Array) -> "DiagonalGaussian":
        """σ = MIN_STD + softplus(raw): positive and smooth for any raw value."""
        return cls(mean, MIN_STD + jax.nn.softplus(raw_std))

    def sample(self, key: jax.Array, num_samples: int) -> jax.Array:
        """Reparameterised draws ``[num_samples, ..., d]``; gradients flow to mean and std."""
        noise = jax.random.normal(key, (num_samples, *self.mean.shape), self.mean.dtype)
        return self.mean + self.std * noise


def gaussian_kl(q: DiagonalGaussian, p: DiagonalGaussian) -> jax.Array:
    """KL(q ‖ p) between diagonal Gaussians, summed over the last axis: ``[..., d] -> [...]``."""
    variance_ratio = jnp.square(q.std / p.std)
    mean_term = jnp.square((q.mean - p.mean) / p.std)
    return 0.5 * jnp.sum(variance_ratio + mean_term - 1.0 - jnp.log(variance_ratio), axis=-1)


def interpolate(z_from: jax.Array, z_to: jax.Array, weights) -> jax.Array:
    """Points (1 − w)·z_from + w·z_to on the line between two users' latents: [d], [d], [W] -> [W, d]."""
    weights = jnp.asarray(weights, z_from.dtype)[:, None]
    return (1.0 - weights) * z_from + weights * z_to
