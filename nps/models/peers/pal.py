"""PAL-A and PAL-B (Chen et al., ICLR 2025): K prototypes or K ideal points, and users as mixtures.

As the release (RamyaLab/pluralistic-alignment) implements them, on nps's option features φ(y):

- f: the "mlp2-gelu" projector, Linear(D, d)-GELU-Linear(d, d)-GELU-Linear(d, d), dropout 0.
- PAL-A (``f(Pw)``, ``dist``): prototypes P ``[K, D]`` in the option space (unit-normalised Gaussian
  rows); user i's ideal point a_i = f(softmax(w_i)ᵀP); the score of an option is −‖f(φ(y)) − a_i‖,
  so the chosen option's margin is ‖f(φ(y_r)) − a_i‖ − ‖f(φ(y_c)) − a_i‖; hinge loss, margin 1.
- PAL-B (``angle``): user i's ideal point u_i = Σ_k softmax(w_i)_k g_k; the score is
  s · cos(f(φ(y)), u_i) with s = min(exp(logit_scale), 100), logit_scale initialised log(1/0.07);
  BTL loss. Since ‖u_i‖ is one positive number per user, the user's preferences are those of the
  mixture Σ_k softmax(w_i)_k r_k of K reward functions r_k(y) = s · ⟨f(φ(y))/‖f(φ(y))‖, g_k⟩.
- Learning rates: the release's W and P 5e-3 and logit_scale 0.1, whatever rate the projectors train
  at (``train_learning_rate``, the release's 1e-4), as ratios to it (``nps.models.peers.mixture.rated_param``):
  exactly the release's rates under ``fit`` with Adam at lr ``train_learning_rate`` (``fit`` refuses another
  rate), with no gradient clipping (a global norm would see the rated groups' gradients ×ratio) and no
  weight decay (which would act on the stored values) — the peers run sets neither.
- New users and training by type id: ``nps.models.peers.mixture``.

Deviations from the release, besides the new-user fit's (``nps.models.peers.mixture``):

- φ(y) is nps's option features (frozen embeddings, or the synthetic options), not token states
  of a fine-tuned or frozen OPT-350m; scoring is per option, not per token position.
- PAL-B's g_k are functions of the prompt's embedding in the release; nps's options carry no
  separate prompt (an option's features embed prompt and response together), so each g_k is a
  learned vector of the preference space (unit-normalised Gaussian init), trained at the
  prototypes' rate.
- PAL-A's projector has no residual x + f(x) (the release's PAL-A config; it needs D = d).
- No weight decay on the projectors (the release's 0.01): ``fit``'s AdamW would decay every
  parameter alike.
- ``fit`` keeps the parameters of best validation NLL of the new users' margins (for PAL-A, the
  BTL likelihood of its uncalibrated distance margins); the release keeps its best validation
  loss (the hinge, for PAL-A).
- A new user takes ``adapt_steps`` = 100 full-batch steps at the release's 5e-3, whatever N^C; the
  release takes 20 epochs of minibatches of 4 (5 steps for one pair, 60 for ten): with w from 0,
  100 steps move a logit by at most 0.5, so the mixture of a user fitted on a few pairs stays near
  uniform (``adapt_learning_rate`` is the knob a tuning grid can turn).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nps.errors import invalid
from nps.layers import MLP
from nps.models.peers.mixture import UserMixtureModel, check_adaptation, hinge_loss, logistic_loss, rated_param

MAX_LOGIT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class PALConfig:
    """PAL-A (``kind="pal-a"``) or PAL-B (``"pal-b"``); defaults from the release's k2 / dim512 configs and
    its optimiser config."""

    kind: str = "pal-a"
    num_prototypes: int = 2  # K
    dim: int = 512  # the preference space's width d
    # Rows of the training user table: at least the task's number of user types (the release's
    # seen users are the top-10 TL;DR workers).
    num_users: int = 10
    # The release's per-group rates: W, P (and PAL-B's g_k) 5e-3, PAL-B's logit_scale 0.1, the
    # projectors ``train_learning_rate``, which must be the rate ``fit`` trains at (train.learning_rate):
    # the groups are trained at their rate ÷ that rate times fit's (``rated_param``).
    user_learning_rate: float = 5e-3
    logit_scale_learning_rate: float = 0.1
    train_learning_rate: float = 1e-4
    # New users: Adam at the release's W rate, a fixed number of full-batch steps.
    adapt_steps: int = 100
    adapt_learning_rate: float = 5e-3

    def __post_init__(self):
        if self.kind not in ("pal-a", "pal-b"):
            raise invalid("kind", self.kind, "must be 'pal-a' or 'pal-b' for a PALConfig")
        for name in ("num_prototypes", "dim"):
            if getattr(self, name) < 1:
                raise invalid(name, getattr(self, name), "must be a positive integer")
        for name in ("user_learning_rate", "logit_scale_learning_rate", "train_learning_rate"):
            if getattr(self, name) <= 0:
                raise invalid(name, getattr(self, name), "must be positive")
        check_adaptation(self)

    @property
    def user_learning_rate_ratio(self) -> float:
        """W, P and g_k's rate over the projectors'."""
        return self.user_learning_rate / self.train_learning_rate

    @property
    def logit_scale_learning_rate_ratio(self) -> float:
        """PAL-B's logit_scale's rate over the projectors'."""
        return self.logit_scale_learning_rate / self.train_learning_rate


def unit_gaussian_rows(key: jax.Array, rows: int, dim: int) -> jax.Array:
    """``[rows, dim]`` Gaussian rows scaled to unit norm (the release's prototype initialiser)."""
    return unit(jax.random.normal(key, (rows, dim)))


def norm(x: jax.Array) -> jax.Array:
    """‖x‖ over the last axis, with a zero gradient rather than NaN at x = 0 (an option at the ideal
    point, or a zeroed padding slot when the ideal point is f(0)). ``[..., d] -> [...]``."""
    return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1), jnp.finfo(x.dtype).tiny))


def unit(x: jax.Array) -> jax.Array:
    """x / ‖x‖ over the last axis."""
    return x / norm(x)[..., None]


class Projector(nnx.Module):
    """The release's "mlp2-gelu": Linear(D, d)-GELU-Linear(d, d)-GELU-Linear(d, d). ``[..., D] -> [..., d]``."""

    def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs):
        self.first = nnx.Linear(in_dim, dim, rngs=rngs)
        self.rest = MLP(dim, dim, dim, "gelu", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.rest(jax.nn.gelu(self.first(x)))

    def of_mixture(self, mixture: jax.Array, points: jax.Array) -> jax.Array:
        """f(mixtureᵀ points) for ``mixture [..., K]``, ``points [K, D]``: the first layer's
        (mixtureᵀ points) W + b as mixtureᵀ (points W) + b, so a new user's fit costs K·d per step
        in that layer rather than D·d (D is 4,096 for an LLM's embeddings)."""
        first = mixture @ (points @ self.first.kernel[...]) + self.first.bias[...]
        return self.rest(jax.nn.gelu(first))


class PALA(UserMixtureModel):
    """PAL-A: ideal point a = f(mixtureᵀP); score −‖f(φ(y)) − a‖; hinge loss."""

    def __init__(self, option_dim: int, config: PALConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.projector = Projector(option_dim, config.dim, rngs=rngs)
        prototypes = unit_gaussian_rows(rngs.params(), config.num_prototypes, option_dim)
        self.prototypes = rated_param(prototypes, config.user_learning_rate_ratio)
        self.init_users(config.num_prototypes, rngs)

    pair_loss = staticmethod(hinge_loss)

    def ideal_point(self, mixture: jax.Array) -> jax.Array:
        """a = f(mixtureᵀP): ``[..., K] -> [..., d]``."""
        return self.projector.of_mixture(mixture, self.prototypes[...] * self.config.user_learning_rate_ratio)

    def embed(self, options: jax.Array) -> jax.Array:
        return self.projector(options)

    def score(self, embedded: jax.Array, mixture: jax.Array) -> jax.Array:
        return -norm(embedded - self.ideal_point(mixture)[..., None, :])


class PALB(UserMixtureModel):
    """PAL-B: ideal point u = mixtureᵀG; score s · cos(f(φ(y)), u); BTL loss."""

    def __init__(self, option_dim: int, config: PALConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.projector = Projector(option_dim, config.dim, rngs=rngs)
        ideal_points = unit_gaussian_rows(rngs.params(), config.num_prototypes, config.dim)
        self.ideal_points = rated_param(ideal_points, config.user_learning_rate_ratio)
        self.logit_scale = rated_param(jnp.asarray(math.log(1 / 0.07), jnp.float32),
                                       config.logit_scale_learning_rate_ratio)
        self.init_users(config.num_prototypes, rngs)

    pair_loss = staticmethod(logistic_loss)

    def scale(self) -> jax.Array:
        """s = min(exp(logit_scale), 100)."""
        logit_scale = self.logit_scale[...] * self.config.logit_scale_learning_rate_ratio
        return jnp.minimum(jnp.exp(logit_scale), MAX_LOGIT_SCALE)

    def ideal_point(self, mixture: jax.Array) -> jax.Array:
        """u = mixtureᵀG: ``[..., K] -> [..., d]``."""
        return mixture @ (self.ideal_points[...] * self.config.user_learning_rate_ratio)

    def embed(self, options: jax.Array) -> jax.Array:
        """f(φ(y)) / ‖f(φ(y))‖."""
        return unit(self.projector(options))

    def score(self, embedded: jax.Array, mixture: jax.Array) -> jax.Array:
        return self.scale() * jnp.sum(embedded * unit(self.ideal_point(mixture))[..., None, :], axis=-1)
