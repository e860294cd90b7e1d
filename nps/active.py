"""Which pair to ask a new user next: expected information gain over plausible users.

The paper's future work (§7): not all pairs are equally informative about a user. nps asks
the pair on which *plausible users disagree most*, measured as the expected information gain
about which user this is (BALD):

    EIG(a, b) = H[ Σ_j w_j p_j ] − Σ_j w_j H[p_j],    p_j = p(a ≻ b | z_j) = σ(r(a; z_j) − r(b; z_j)).

The plausible users z_1..z_P are the model's latents for P tasks of the training population
(``particle_latents``: each conditioned on a context of its own user's pairs, so the particles
span the user types, or the continuum, that the model learnt). Their weights w start uniform
and are updated by Bayes' rule with the model's own likelihood of each answer,
log w_j += log p(answer | z_j). The rule works for deterministic NP-BTL (the particles are an
ensemble of z from different contexts) and for the variational one (z = the mean of q(z | C)).
A pair whose options every plausible user ranks alike has EIG 0 however uncertain each p_j is,
so the rule ignores pairs that are merely hard (aleatoric) and asks the ones that separate users.

The user's reward is never read from the particles: after each answer the model is conditioned
on the answered pairs, as at any N^C, and scored on the user's unseen pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nps.data.episodes import EpisodeSpec, PairPool, sample_episodes


def particle_latents(model, pool: PairPool, spec: EpisodeSpec, num_particles: int, context_size: int,
                     seed: int = 0) -> jax.Array:
    """z [P, d] of ``num_particles`` population tasks from ``pool`` with ``context_size`` context pairs."""
    spec = EpisodeSpec(num_targets=max(spec.num_targets, context_size), max_context=context_size,
                       user_prior=spec.user_prior, dirichlet_concentration=spec.dirichlet_concentration)
    episodes = sample_episodes(jax.random.key(seed), pool, spec, num_particles, context_size)
    return model.context_latent(episodes)


def particle_choice_probabilities(model, z: jax.Array, option_a: jax.Array, option_b: jax.Array) -> jax.Array:
    """p(a ≻ b | z_j) [P, M] for particles z [P, d] and M candidate pairs of options [M, D]."""
    return jax.nn.sigmoid(model.reward(option_a, z) - model.reward(option_b, z))


def _entropy(p: jax.Array) -> jax.Array:
    p = jnp.clip(p, 1e-7, 1 - 1e-7)
    return -(p * jnp.log(p) + (1 - p) * jnp.log1p(-p))


def expected_information_gain(log_weights: jax.Array, probabilities: jax.Array) -> jax.Array:
    """EIG [U, M] in nats of each candidate for each user's particle posterior.

    log_weights [U, P] (unnormalised), probabilities [P, M] = p(a ≻ b | z_j).
    """
    weights = jax.nn.softmax(log_weights, axis=-1)
    return _entropy(weights @ probabilities) - weights @ _entropy(probabilities)


def update_log_weights(log_weights: jax.Array, probabilities: jax.Array, asked: jax.Array,
                       first_chosen: jax.Array) -> jax.Array:
    """Bayes' rule for the answers: ``asked`` [U] candidate ids, ``first_chosen`` [U] bool."""
    p = jnp.clip(probabilities[:, asked].T, 1e-7, 1 - 1e-7)  # [U, P]
    return log_weights + jnp.where(first_chosen[:, None], jnp.log(p), jnp.log1p(-p))


def most_informative(log_weights: jax.Array, probabilities: jax.Array, already_asked: jax.Array) -> jax.Array:
    """The candidate id [U] with the largest EIG among those not yet asked (``already_asked`` [U, M] bool)."""
    gain = expected_information_gain(log_weights, probabilities)
    return jnp.argmax(jnp.where(already_asked, -jnp.inf, gain), axis=-1)
