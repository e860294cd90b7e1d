"""Choice likelihoods over preference pairs, as pure functions of rewards.

Every model in nps reduces to one number per pair: the predictive *log-odds*
m = log p(chosen ≻ rejected) − log p(rejected ≻ chosen). Then
log p(chosen ≻ rejected) = log σ(m), accuracy is 1[m > 0], and the losses of
BTL, DPL and the neural-process posterior predictive share one code path.

Shapes: any leading batch shape ``[...]``; masks broadcast against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr


def btl_log_odds(reward_chosen: jax.Array, reward_rejected: jax.Array) -> jax.Array:
    """Bradley-Terry-Luce log-odds: r(a) − r(b).  ``[...] , [...] -> [...]``."""
    return reward_chosen - reward_rejected


def btl_log_prob(reward_a: jax.Array, reward_b: jax.Array) -> jax.Array:
    """log p(a ≻ b) = log σ(r(a) − r(b)) under BTL.  ``[...] , [...] -> [...]``."""
    return jax.nn.log_sigmoid(btl_log_odds(reward_a, reward_b))


def _dpl_standardised_gap(mean_a, std_a, mean_b, std_b):
    return (mean_a - mean_b) / jnp.sqrt(jnp.square(std_a) + jnp.square(std_b))


def dpl_log_prob(
    mean_a: jax.Array, std_a: jax.Array, mean_b: jax.Array, std_b: jax.Array
) -> jax.Array:
    """DPL mean-variance log p(a ≻ b) = log Φ((μa − μb) / √(σa² + σb²)).

    This is the exact probability that r(a) > r(b) for independent
    r(y) ~ N(μ(y), σ(y)²), computed with ``log_ndtr`` so that it stays finite
    far in the tails. (The released PyTorch code uses the logistic
    approximation σ(√(2π)·gap) instead; nps does not.)
    """
    return log_ndtr(_dpl_standardised_gap(mean_a, std_a, mean_b, std_b))


def dpl_log_odds(
    mean_chosen: jax.Array, std_chosen: jax.Array, mean_rejected: jax.Array, std_rejected: jax.Array
) -> jax.Array:
    """DPL log-odds log Φ(g) − log Φ(−g); ``log σ`` of it equals ``dpl_log_prob`` exactly."""
    gap = _dpl_standardised_gap(mean_chosen, std_chosen, mean_rejected, std_rejected)
    return log_ndtr(gap) - log_ndtr(-gap)


def posterior_predictive_log_odds(sample_log_odds: jax.Array, axis: int = 0) -> jax.Array:
    """Log-odds of the Monte-Carlo posterior predictive p = mean_s σ(m_s).

    ``sample_log_odds`` holds one log-odds per latent sample along ``axis``;
    the result drops that axis. Exact in log space: log mean σ(m) − log mean σ(−m).
    """
    return jax.nn.logsumexp(jax.nn.log_sigmoid(sample_log_odds), axis=axis) - jax.nn.logsumexp(
        jax.nn.log_sigmoid(-sample_log_odds), axis=axis
    )


def masked_mean(values: jax.Array, mask: jax.Array, axis=-1) -> jax.Array:
    """Mean of ``values`` over ``axis`` where ``mask``; 0 (not NaN) for an empty row."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def choice_nll(log_odds: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of the observed choices per task.

    ``log_odds [B, T]`` of chosen over rejected, ``mask [B, T]`` of real pairs -> ``[B]``.
    """
    return masked_mean(-jax.nn.log_sigmoid(log_odds), mask)


def choice_correct(log_odds: jax.Array) -> jax.Array:
    """1 where the model prefers the chosen option, ½ on an exact tie, else 0."""
    return jnp.where(log_odds > 0, 1.0, jnp.where(log_odds == 0, 0.5, 0.0))


def choice_accuracy(log_odds: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-task accuracy over masked pairs: ``[B, T], [B, T] -> [B]``."""
    return masked_mean(choice_correct(log_odds), mask)
