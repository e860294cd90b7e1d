"""Which pair to ask a new user next: expected information gain over plausible users.

The paper's future work (§7): not all pairs are equally informative about a user. nps asks
the pair on which *plausible users disagree most*, measured as the expected information gain
about which user this is (BALD):

    EIG(a, b) = H[ Σ_j w_j p_j ] − Σ_j w_j H[p_j],    p_j = p(a ≻ b | z_j) = σ(r(a; z_j) − r(b; z_j)).

The plausible users z_1..z_P are the model's latents for P tasks of the training population
(``particle_latents``: each conditioned on a context of its own user's pairs, so the particles
span the user types, or the continuum, that the model learnt). Their weights w start uniform
and are updated by Bayes' rule with the model's own likelihood of each answer,
log w_j += log p(answer | z_j). The rule works for any per-user preference model
(``nps.models.interface``: ``context_latent`` and ``target_log_odds``): for deterministic NP-BTL the
particles are an ensemble of z from different contexts, for the variational one the means of q(z | C).
A pair whose options every plausible user ranks alike has EIG 0 however uncertain each p_j is,
so the rule ignores pairs that are merely hard (aleatoric) and asks the ones that separate users.

The user's reward is never read from the particles: after each answer the model is conditioned
on the answered pairs, as at any N^C, and scored on the user's unseen pairs.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nps.data.episodes import Episodes, EpisodeSpec, context_capacity, sample_episodes
from nps.data.pairs import AnsweredPairs, PairPool, order_pairs, take_rows
from nps.likelihood import choice_accuracy
from nps.models.interface import PerUserPreferenceModel, check_model


def _episodes(context_a, context_b, context_first, context_mask, pairs: AnsweredPairs) -> Episodes:
    """Tasks [U]: the answered pairs as context, every pair of ``pairs`` as an unseen target."""
    num_users, num_targets = pairs.first_chosen.shape
    broadcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_users, *x.shape)), tree)  # noqa: E731
    context_chosen, context_rejected = order_pairs(context_first, context_a, context_b)
    target_chosen, target_rejected = order_pairs(pairs.first_chosen, broadcast(pairs.option_a),
                                                 broadcast(pairs.option_b))
    # The users' identities are not needed to predict their choices: placeholders.
    return Episodes(context_chosen, context_rejected, context_mask, target_chosen, target_rejected,
                    jnp.ones((num_users, num_targets), bool), jnp.zeros((num_users, num_targets), bool),
                    jnp.zeros((num_users,), jnp.int32), jnp.ones((num_users, 1)))


def particle_latents(model: PerUserPreferenceModel, pool: PairPool, spec: EpisodeSpec, num_particles: int,
                     context_size: int, key: jax.Array) -> jax.Array:
    """z [P, d] of ``num_particles`` population tasks from ``pool`` with ``context_size`` context pairs."""
    check_model(model, PerUserPreferenceModel)
    return _particle_latents(*nnx.split(model), pool, key, spec=spec.for_context(context_size),
                             num_particles=num_particles, context_size=context_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "num_particles", "context_size"))
def _particle_latents(graphdef, state, pool, key, *, spec, num_particles, context_size):
    episodes = sample_episodes(key, pool, spec, num_particles, context_size)
    return nnx.merge(graphdef, state).context_latent(episodes)


def particle_choice_probabilities(model: PerUserPreferenceModel, z: jax.Array, option_a: Any,
                                  option_b: Any) -> jax.Array:
    """p(a ≻ b | z_j) [P, M] for particles z [P, d] and M candidate pairs (option pytrees, leading M)."""
    check_model(model, PerUserPreferenceModel)
    return _compiled_choice_probabilities(*nnx.split(model), z, option_a, option_b)


def _choice_probabilities(model, z, option_a, option_b):
    num_particles = z.shape[0]
    broadcast = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_particles, *x.shape)), tree)  # noqa: E731
    num_pairs = jax.tree.leaves(option_a)[0].shape[0]
    targets = Episodes(None, None, None, broadcast(option_a), broadcast(option_b),
                       jnp.ones((num_particles, num_pairs), bool), None, None, None)
    return jax.nn.sigmoid(model.target_log_odds(targets, z))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _compiled_choice_probabilities(graphdef, state, z, option_a, option_b):
    return _choice_probabilities(nnx.merge(graphdef, state), z, option_a, option_b)


def _entropy(p: jax.Array) -> jax.Array:
    p = jnp.clip(p, 1e-7, 1 - 1e-7)
    return -(p * jnp.log(p) + (1 - p) * jnp.log1p(-p))


def expected_information_gain(log_weights: jax.Array, probabilities: jax.Array) -> jax.Array:
    """EIG [U, M] in nats of each candidate for each user's particle posterior.

    log_weights [U, P] (unnormalised), probabilities [P, M] = p(a ≻ b | z_j).
    """
    weights = jax.nn.softmax(log_weights, axis=-1)
    return _entropy(weights @ probabilities) - weights @ _entropy(probabilities)


@jax.jit
def update_log_weights(log_weights: jax.Array, probabilities: jax.Array, asked: jax.Array,
                       first_chosen: jax.Array) -> jax.Array:
    """Bayes' rule for the answers: ``asked`` [U] candidate ids, ``first_chosen`` [U] bool."""
    p = jnp.clip(probabilities[:, asked].T, 1e-7, 1 - 1e-7)  # [U, P]
    return log_weights + jnp.where(first_chosen[:, None], jnp.log(p), jnp.log1p(-p))


@jax.jit
def _log_weights_after(probabilities: jax.Array, asked: jax.Array, first_chosen: jax.Array,
                       answered: jax.Array) -> jax.Array:
    def add(log_weights, answer):
        index, first, real = answer
        return jnp.where(real, update_log_weights(log_weights, probabilities, index[None], first[None]),
                         log_weights), None

    return jax.lax.scan(add, jnp.zeros((1, probabilities.shape[0])), (asked, first_chosen, answered))[0]


def log_weights_after(probabilities: jax.Array, answers: list[tuple[int, bool]]) -> jax.Array:
    """One user's particle log weights [1, P] after ``answers`` (candidate id, first option chosen),
    given probabilities [P, M]: Bayes' rule one answer at a time, in their order, so the result is
    the same as ``update_log_weights`` applied answer by answer (a rebuilt posterior is the live one).
    Answers are padded to ``context_capacity``: one compiled program per bucket."""
    slots = context_capacity(len(answers))
    asked, first, answered = np.zeros(slots, np.int32), np.zeros(slots, bool), np.zeros(slots, bool)
    for row, (index, chosen_first) in enumerate(answers):
        asked[row], first[row], answered[row] = index, chosen_first, True
    return _log_weights_after(probabilities, asked, first, answered)


@functools.partial(jax.jit, static_argnames=("min_gain",))
def most_informative(log_weights: jax.Array, probabilities: jax.Array, already_asked: jax.Array,
                     fallback: jax.Array | None = None, min_gain: float = 1e-3) -> jax.Array:
    """The candidate id [U] with the largest EIG among those not yet asked (``already_asked`` [U, M]).

    Once no candidate is informative any more (largest EIG < ``min_gain`` nats: the plausible users
    all agree) the rule has nothing to choose by, and its argmax would pick the pairs every user
    ranks alike, a context a model may never have been trained on. Then ``fallback`` [U] (e.g. a
    random unasked candidate) is asked instead; without one, the argmax stands.
    """
    gain = jnp.where(already_asked, -jnp.inf, expected_information_gain(log_weights, probabilities))
    best = jnp.argmax(gain, axis=-1)
    if fallback is None:
        return best
    return jnp.where(jnp.max(gain, axis=-1) >= min_gain, best, fallback)


def _accuracy(model, context_ids, context_first, context_mask, candidates: AnsweredPairs, evaluation: AnsweredPairs,
              key):
    """Each user's accuracy [U] on ``evaluation`` with the answered candidates as context."""
    context_a, context_b = take_rows(candidates.option_a, context_ids), take_rows(candidates.option_b, context_ids)
    episodes = _episodes(context_a, context_b, context_first, context_mask, evaluation)
    return choice_accuracy(model.predict_log_odds(episodes, key), episodes.unseen_mask)


def answer_curves(model: PerUserPreferenceModel, candidates: AnsweredPairs, evaluation: AnsweredPairs,
                  particles: jax.Array, strategy: str, max_pairs: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Simulated users answer ``max_pairs`` candidates one at a time, chosen at ``"random"`` or by
    ``"active"`` (EIG over ``particles``); after each answer the model, conditioned on every
    answered pair, is scored on the users' choices on ``evaluation``.

    Active choice falls back to the random order once no candidate is informative (``most_informative``).
    Returns accuracy [U, max_pairs + 1] (after 0..max_pairs answers) and the asked ids [U, max_pairs];
    the whole simulation is one compiled scan, and the host reads its result once.
    """
    if strategy not in ("random", "active"):
        raise ValueError(f"strategy={strategy!r}: use 'random' or 'active'")
    check_model(model, PerUserPreferenceModel)
    graphdef, state = nnx.split(model)
    accuracy, asked = _answer_curves(graphdef, state, candidates, evaluation, particles, key, strategy=strategy,
                                     max_pairs=max_pairs)
    return jax.device_get((accuracy, asked))


@functools.partial(jax.jit, static_argnames=("graphdef", "strategy", "max_pairs"))
def _answer_curves(graphdef, state, candidates: AnsweredPairs, evaluation: AnsweredPairs, particles, key, *,
                   strategy: str, max_pairs: int):
    model = nnx.merge(graphdef, state)
    num_users, num_candidates = candidates.first_chosen.shape
    order_key, model_key = jax.random.split(key)
    probabilities = _choice_probabilities(model, particles, candidates.option_a, candidates.option_b)
    random_order = jax.vmap(lambda k: jax.random.permutation(k, num_candidates))(
        jax.random.split(order_key, num_users))
    users = jnp.arange(num_users)

    def answer(carry, n):
        context_ids, context_first, context_mask, log_weights, asked_mask = carry
        accuracy = _accuracy(model, context_ids, context_first, context_mask, candidates, evaluation, model_key)
        # The next candidate of each user's random order that has not been asked yet.
        unasked_in_order = ~jnp.take_along_axis(asked_mask, random_order, axis=1)
        random_next = jnp.take_along_axis(random_order, jnp.argmax(unasked_in_order, axis=1)[:, None], axis=1)[:, 0]
        index = random_next if strategy == "random" else most_informative(log_weights, probabilities, asked_mask,
                                                                           fallback=random_next)
        first = candidates.first_chosen[users, index]
        carry = (context_ids.at[:, n].set(index), context_first.at[:, n].set(first),
                 context_mask.at[:, n].set(True), update_log_weights(log_weights, probabilities, index, first),
                 asked_mask.at[users, index].set(True))
        return carry, (accuracy, index)

    start = (jnp.zeros((num_users, max_pairs), jnp.int32), jnp.zeros((num_users, max_pairs), bool),
             jnp.zeros((num_users, max_pairs), bool), jnp.zeros((num_users, particles.shape[0])),
             jnp.zeros((num_users, num_candidates), bool))
    final, (accuracy, asked) = jax.lax.scan(answer, start, jnp.arange(max_pairs))
    last = _accuracy(model, *final[:3], candidates, evaluation, model_key)
    return jnp.concatenate([accuracy, last[None]]).T, asked.T


def pairs_needed(accuracy: np.ndarray, target: float) -> np.ndarray:
    """Per user [U]: the first number of answers whose accuracy ≥ target (max_pairs + 1 if never)."""
    reached = accuracy >= target
    return np.where(reached.any(axis=1), reached.argmax(axis=1), accuracy.shape[1])


def next_informative(log_weights: jax.Array, probabilities: jax.Array, asked: Iterable[int],
                     order: Iterable[int]) -> int | None:
    """The question to ask one user next: the unasked candidate with the largest EIG for their particle
    weights [1, P] (``probabilities`` [P, M]); once none is informative, the first unasked candidate of
    ``order``; None when every candidate was asked. What ``nps collect --active`` and the app ask."""
    asked_mask = np.zeros((1, probabilities.shape[1]), bool)
    asked_mask[0, sorted(asked)] = True
    fallback = next((int(i) for i in order if not asked_mask[0, i]), None)
    if fallback is None:
        return None
    return int(most_informative(log_weights, probabilities, asked_mask, np.array([fallback]))[0])


def informative_chooser(model: PerUserPreferenceModel, particles: jax.Array, option_a: Any, option_b: Any):
    """A ``next_candidate`` for ``nps.data.profiles.collect``: after the answers so far, the unasked
    candidate with the largest EIG (file order once none is informative, or None when all were asked).
    ``option_a`` / ``option_b``: the model's options of each candidate's two responses, in file order."""
    probabilities = particle_choice_probabilities(model, particles, option_a, option_b)

    def next_candidate(candidates: list[dict], answered: list[dict], asked: set[int]) -> int | None:
        log_weights = log_weights_after(probabilities, [
            (int(r["candidate"]), r["chosen"] == candidates[int(r["candidate"])]["responses"][0]) for r in answered])
        return next_informative(log_weights, probabilities, asked, range(len(candidates)))

    return next_candidate
