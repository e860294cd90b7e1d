"""Direct preference optimisation as pure functions: response log-probabilities and DPO log-odds.

The DPO implicit reward of a response is r(y) = β·(log π(y | x, C) − log π_ref(y | x)),
and p(y^w ≻ y^ℓ) = σ(r(y^w) − r(y^ℓ)) (paper Eq. 8 / 24), so DPO is a BTL likelihood
on these log-odds: ``nps.likelihood.choice_nll`` of ``dpo_log_odds`` is the DPO loss.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_log_probs(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    tokens: jax.Array,
    chunk: int = 128,
) -> jax.Array:
    """log p(tokens[:, t] | tokens[:, :t]) for t ≥ 1, from hidden states; [B, T - 1] fp32.

    hidden [B, T, D] are the decoder's final states (position t predicts token t + 1);
    ``logits_fn`` maps [..., D] to [..., V] logits (the LM head). The head runs over
    ``chunk`` positions at a time and is recomputed in the backward pass, so fp32
    logits over the vocabulary exist for one chunk only, never for the whole batch.
    """
    batch, length, dim = hidden.shape
    steps = length - 1
    chunk = max(1, min(chunk, steps))
    num_chunks = -(-steps // chunk)
    padded = num_chunks * chunk
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, padded - steps), (0, 0)))
    y = jnp.pad(tokens[:, 1:], ((0, 0), (0, padded - steps)))
    h = h.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
    y = y.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        h_chunk, y_chunk = args
        logits = logits_fn(h_chunk).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, y_chunk[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(one_chunk, (h, y))  # [num_chunks, B, chunk]
    return out.swapaxes(0, 1).reshape(batch, padded)[:, :steps]


def response_log_probs(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    tokens: jax.Array,
    response_mask: jax.Array,
    chunk: int = 128,
) -> jax.Array:
    """log π(response | prompt) [B]: the sum over response tokens only (prompt and padding excluded).

    response_mask [B, T] marks the response's tokens; the first token can never be one
    (it has no prefix to be predicted from).
    """
    per_token = token_log_probs(logits_fn, hidden, tokens, chunk)
    return jnp.sum(jnp.where(response_mask[:, 1:], per_token, 0.0), axis=-1)


def dpo_log_odds(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    beta: float,
) -> jax.Array:
    """β[(log π(y^w) − log π_ref(y^w)) − (log π(y^ℓ) − log π_ref(y^ℓ))]: the log-odds that y^w ≻ y^ℓ."""
    return beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
