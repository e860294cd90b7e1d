"""Users as mixture weights over shared components, learned by user id and fitted to a new user's context.

PAL (K prototypes, or K ideal points) and LoRe (a basis of B rewards) share one structure: user i
is a vector of logits w_i ∈ R^K whose softmax weighs K shared components, and everything else is
shared by all users. A subclass says how an option is embedded once (``embed``), how a mixture
scores an embedded option (``score``) and which loss one pair pays (``pair_loss``).

Training (the releases' joint training): one row of logits per user id, looked up by the task's
``Episodes.user``, its user type z*, trained with the shared parameters on the task's N^T target
pairs; the context plays no part. The type is an oracle label that NP-BTL never sees; with
``user_prior="dirichlet"`` it is the attribute of largest weight, not a user. An id outside the
table gives NaN logits, so a table too small for the task shows as a NaN loss, never as a silent
default.

A new user (the releases' unseen-user scripts): its logits start at w = 0 and take ``adapt_steps``
full-batch Adam steps on the mean loss of its N^C context pairs, everything else frozen. The steps
are one ``fori_loop`` inside the caller's jit over all tasks' ``[B, K]`` logits at once: the tasks
share no logits and Adam acts elementwise, so this is each task's own fit, with the context a mask
(one program for every N^C). Deviations from the releases: w starts at 0 (the uniform mixture)
instead of N(0, I), so the fit is deterministic; every step sees all N^C pairs (as LoRe's release;
PAL's takes minibatches of 4, whose order would make the fit depend on the order of the pairs);
the step count is fixed (PAL's release keeps the epoch of best validation loss: a new user here has
only its context). No gradient flows through the fit (it is a test-time procedure, not training).

The empty context (N^C = 0): the mean loss over no pairs is 0, its gradient is 0 and Adam's update
is 0, so w stays 0: the uniform mixture softmax(0) = 1/K (no release defines this case).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nps.data.episodes import Episodes
from nps.errors import invalid
from nps.likelihood import btl_log_odds, masked_mean
from nps.models.interface import PerUserRewardModel
from nps.models.reward import accuracy_aux


def check_adaptation(config) -> None:
    """The user-table and new-user settings every mixture config shares are usable."""
    for name in ("num_users", "adapt_steps"):
        if getattr(config, name) < 1:
            raise invalid(name, getattr(config, name), "must be a positive integer")
    for name in ("adapt_learning_rate", "user_learning_rate_ratio"):
        if getattr(config, name) <= 0:
            raise invalid(name, getattr(config, name), "must be positive")


def rated_param(value: jax.Array, ratio: float) -> nnx.Param:
    """A parameter trained ``ratio`` times faster than ``fit``'s learning rate η: stored as
    value / ratio, read as stored · ``ratio`` (``nnx.Param[...] * ratio``).

    ``fit`` has one learning rate for every parameter; the releases give some their own (PAL's
    user weights and prototypes 5e-3 against its projectors' 1e-4). Adam is invariant to the scale
    of a gradient, so a step moves the stored value by about η and the value read by about
    ratio · η: the release's per-group rates when η is its base rate (exactly, but for Adam's ε,
    which acts as ε / ratio).
    """
    return nnx.Param(value / ratio)


def hinge_loss(log_odds: jax.Array) -> jax.Array:
    """max(0, 1 − m): PAL-A's hinge with margin 1 on the chosen option's score margin m."""
    return jax.nn.relu(1.0 - log_odds)


def logistic_loss(log_odds: jax.Array) -> jax.Array:
    """−log σ(m): BTL's negative log-likelihood of the observed choice."""
    return -jax.nn.log_sigmoid(log_odds)


def fit_mixture_logits(pair_margins, mask: jax.Array, num_components: int, pair_loss, steps: int,
                       learning_rate: float) -> jax.Array:
    """Each task's logits w ``[B, K]`` after ``steps`` Adam steps from 0 on its mean context loss.

    ``pair_margins(w [B, K]) -> [B, C]``: the chosen option's margin over the rejected one for every
    context slot under the mixture softmax(w); ``mask [B, C]``: the real pairs; ``pair_loss``: the
    loss of one margin. Minimises Σ_b mean_{c: mask[b, c]} pair_loss(margin[b, c]), whose gradient
    in w_b is task b's own.
    """
    optimizer = optax.adam(learning_rate)

    def total_loss(logits):
        return jnp.sum(masked_mean(pair_loss(pair_margins(logits)), mask))

    def step(_, carry):
        logits, state = carry
        updates, state = optimizer.update(jax.grad(total_loss)(logits), state)
        return optax.apply_updates(logits, updates), state

    logits = jnp.zeros((mask.shape[0], num_components), jnp.float32)
    logits, _ = jax.lax.fori_loop(0, steps, step, (logits, optimizer.init(logits)))
    return jax.lax.stop_gradient(logits)


class UserMixtureModel(PerUserRewardModel):
    """The shared part of PAL-A, PAL-B and LoRe (see the module docstring).

    Subclasses set ``self.config`` (with ``num_users``, ``adapt_steps``, ``adapt_learning_rate``,
    ``user_learning_rate_ratio``), call ``init_users`` and implement ``embed``, ``score`` and
    ``pair_loss``. The per-user state z is the mixture weights softmax(w) ``[B, K]``.
    """

    def init_users(self, num_components: int, rngs: nnx.Rngs) -> None:
        """The user table: logits ``[num_users, K]`` ~ N(0, I) (the releases' initialisation)."""
        self.num_components = num_components
        logits = jax.random.normal(rngs.params(), (self.config.num_users, num_components))
        self.user_logits = rated_param(logits, self.config.user_learning_rate_ratio)

    @property
    def adaptation_gradient_steps(self) -> int:
        """The gradient steps a new user's fit takes (``adapt_steps``, whatever its N^C)."""
        return self.config.adapt_steps

    def embed(self, options: jax.Array):
        """What the mixture does not change about an option: ``[..., D] -> [..., E]``."""
        raise NotImplementedError

    def score(self, embedded: jax.Array, mixture: jax.Array) -> jax.Array:
        """Scores ``[..., N]`` of embedded options ``[..., N, E]`` for mixtures ``[..., K]``."""
        raise NotImplementedError

    @staticmethod
    def pair_loss(log_odds: jax.Array) -> jax.Array:
        raise NotImplementedError

    def reward(self, options: jax.Array, z: jax.Array) -> jax.Array:
        """``options [..., N, D]``, mixture ``z [..., K]`` -> scores ``[..., N]``."""
        return self.score(self.embed(options), z)

    def margins(self, embedded_chosen: jax.Array, embedded_rejected: jax.Array, mixture: jax.Array) -> jax.Array:
        """score(chosen) − score(rejected) ``[..., N]`` of embedded pairs ``[..., N, E]``: both sides in one
        ``score`` call, which computes the user's ideal point once (PAL-A's is a projector pass)."""
        scores = self.score(jnp.concatenate([embedded_chosen, embedded_rejected], axis=-2), mixture)
        return btl_log_odds(*jnp.split(scores, 2, axis=-1))

    def target_log_odds(self, episodes: Episodes, z: jax.Array) -> jax.Array:
        """Log-odds ``[B, T]`` of each target's chosen option for the users with mixtures z ``[B, K]``."""
        return self.margins(self.embed(episodes.target_chosen), self.embed(episodes.target_rejected), z)

    def fit_user_logits(self, chosen: jax.Array, rejected: jax.Array, mask: jax.Array) -> jax.Array:
        """A new user's logits ``[B, K]`` fitted to the pairs ``[B, C, D]`` where ``mask [B, C]``.

        Padding slots are zeroed before anything reads them (junk in them changes nothing), and
        the options are embedded once: only the mixture changes from step to step.
        """
        def real(options):
            return jnp.where(mask[..., None], options, 0.0)

        embedded_chosen, embedded_rejected = jax.lax.stop_gradient(
            (self.embed(real(chosen)), self.embed(real(rejected))))

        def margins(logits):
            return self.margins(embedded_chosen, embedded_rejected, jax.nn.softmax(logits, axis=-1))

        config = self.config
        return fit_mixture_logits(margins, mask, self.num_components, self.pair_loss, config.adapt_steps,
                                  config.adapt_learning_rate)

    def context_latent(self, episodes: Episodes) -> jax.Array:
        """The new user's mixture softmax(w) ``[B, K]`` fitted to its context (uniform for N^C = 0)."""
        logits = self.fit_user_logits(episodes.context_chosen, episodes.context_rejected, episodes.context_mask)
        return jax.nn.softmax(logits, axis=-1)

    def objective(self, episodes: Episodes, key: jax.Array):
        """Mean pair loss over the targets with the task's user-id row of the table (see the module)."""
        table = self.user_logits[...] * self.config.user_learning_rate_ratio
        logits = jnp.take(table, episodes.user, axis=0, mode="fill", fill_value=jnp.nan)
        log_odds = self.target_log_odds(episodes, jax.nn.softmax(logits, axis=-1))
        loss = jnp.mean(masked_mean(self.pair_loss(log_odds), episodes.target_mask))
        return loss, accuracy_aux(log_odds, episodes)
