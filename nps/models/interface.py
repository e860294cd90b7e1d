"""The preference-model interface: what training, evaluation, active questions, consistency checks
and scorers call on a model, and the one way a public function takes a model.

A **preference model** predicts, for a batch of tasks (``nps.data.episodes.Episodes``: each task
a user's context pairs and target pairs), how likely each target's chosen option is to win:

- ``objective(episodes, key) -> (loss, aux)``: the training loss (a scalar) on a batch of tasks and
  a dict of scalar metrics to log (``"accuracy"`` at least);
- ``predict_log_odds(episodes, key=None) -> [B, T]``: the predictive log-odds of each target's
  chosen over its rejected option given the task's context (and nothing else: never its targets'
  labels). ``key`` drives sampling where the prediction samples (a variational latent).

A **per-user preference model** holds each user's preferences in a point state computed from the
context alone, and predicts every target from that state:

- ``context_latent(episodes) -> z [B, d]``: the state of each task's user, from its context pairs
  (their options and mask; an empty context is a mask of False, never a special case);
- ``target_log_odds(episodes, z) -> [B, T]``: the targets' log-odds for users in state z [B, d].

Its ``predict_log_odds`` is ``target_log_odds(episodes, context_latent(episodes))`` unless the model
says otherwise (a variational NP-BTL averages over samples of q(z | C) instead). The active chooser,
the consistency checks and a served user's latent need this second interface; ``fit`` and the
unseen-target evaluation need only the first.

A **per-user reward model** scores each option for a state, and its choices are BTL on those scores:

- ``reward(options, z) -> [B, N]``: options [B, N, ...] for users in state z [B, d];
  ``target_log_odds`` is then r(chosen | z) − r(rejected | z) unless the model computes it its own way.

`nps ab`'s reward scorers and the reward plots need this third interface (NP-BTL, VPL, PAL, LoRe).

**One argument convention.** Every public function that uses a model takes the model itself (an
``nnx.Module``), first. Compilation is internal: the function splits the model once,
``nnx.split(model) -> (graphdef, state)``, and calls a module-level ``jax.jit`` function with the
graphdef static and the state as an argument, which merges them inside. Models of one structure
share each compiled program (their graphdefs are equal), however many seeds or users they serve.

Declare a model by subclassing ``PreferenceModel`` or ``PerUserPreferenceModel``: a subclass that
leaves a method out cannot be built (Python names the method). ``check_model`` refuses, in one line
naming the missing method, any object a public function is given that lacks one.
"""

from __future__ import annotations

import abc
import functools
from typing import Any

import jax
from flax import nnx

from nps.data.episodes import Episodes
from nps.likelihood import btl_log_odds


class PreferenceModel(nnx.Module):
    """A model of pairwise choices on tasks: trainable by ``nps.train.fit``, scored by
    ``nps.train.evaluate``."""

    @abc.abstractmethod
    def objective(self, episodes: Episodes, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, aux): the training loss on a batch of tasks and scalar metrics (``"accuracy"``)."""

    @abc.abstractmethod
    def predict_log_odds(self, episodes: Episodes, key: jax.Array | None = None) -> jax.Array:
        """[B, T]: log p(chosen ≻ rejected | context) − log p(rejected ≻ chosen | context) per target."""


class PerUserPreferenceModel(PreferenceModel):
    """A preference model whose prediction goes through a per-user state z computed from the context."""

    @abc.abstractmethod
    def context_latent(self, episodes: Episodes) -> jax.Array:
        """z [B, d]: a point state per task from its context pairs only (reads no target field)."""

    @abc.abstractmethod
    def target_log_odds(self, episodes: Episodes, z: jax.Array) -> jax.Array:
        """[B, T]: the log-odds of each target's chosen option for the user in state z [B, d]."""

    def predict_log_odds(self, episodes: Episodes, key: jax.Array | None = None) -> jax.Array:
        return self.target_log_odds(episodes, self.context_latent(episodes))


class PerUserRewardModel(PerUserPreferenceModel):
    """A per-user preference model whose choices are BTL on a reward per option and user state."""

    @abc.abstractmethod
    def reward(self, options: Any, z: jax.Array) -> jax.Array:
        """[B, N]: the rewards of options [B, N, ...] for the users in state z [B, d]."""

    def target_log_odds(self, episodes: Episodes, z: jax.Array) -> jax.Array:
        return btl_log_odds(self.reward(episodes.target_chosen, z), self.reward(episodes.target_rejected, z))


def interface_methods(interface: type[PreferenceModel]) -> tuple[str, ...]:
    """The methods ``interface`` requires, in the order its classes declare them."""
    names = []
    for cls in reversed(interface.__mro__):
        names += [name for name, value in vars(cls).items()
                  if getattr(value, "__isabstractmethod__", False) and name not in names]
    return tuple(names)


def check_model(model: Any, interface: type[PreferenceModel] = PreferenceModel) -> None:
    """Refuse ``model`` in one line (``TypeError``) naming the first method of ``interface`` it lacks."""
    for name in interface_methods(interface):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"{type(model).__name__} is not a {interface.__name__}: it has no {name}() method; "
                            f"implement it (see nps.models.interface)")


def context_latents(model: PerUserPreferenceModel, chosen: Any, rejected: Any, mask: jax.Array) -> jax.Array:
    """z [B, d] of B users known by their context pairs, outside a jit: ``chosen`` / ``rejected`` are
    option pytrees [B, C, ...] in the model's own form, ``mask`` [B, C]. One compiled program per
    capacity C (``context_capacity``), where an eager call would compile one per operation."""
    check_model(model, PerUserPreferenceModel)
    return _context_latents(*nnx.split(model), chosen, rejected, mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _context_latents(graphdef, state, chosen, rejected, mask):
    contexts = Episodes(chosen, rejected, mask, None, None, None, None, None, None)
    return nnx.merge(graphdef, state).context_latent(contexts)
