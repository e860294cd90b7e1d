"""LoRe (Bose et al., 2025): a low-rank reward basis shared by all users, and per-user weights on it.

As the release (facebookresearch/LoRe, class ``LoRe`` and ``PersonalizeBatch``) implements it:
user i's reward is r_i(y) = φ(y)ᵀ V softmax(w_i) / 100 with V ``[D, B]`` and the logits w_i both
initialised N(0, 1), so every user's reward lies in the span of the B basis rewards
r_b(y) = φ(y)ᵀ V_b / 100; the loss is −log σ(r_i(y_c) − r_i(y_r)), averaged over each user's pairs.
The release trains W and V jointly with Adam at lr 0.5 for 1,000 full-batch iterations (its TL;DR
run, with the regulariser toward a reference reward off, α = 0), and fits a new user's weights with
V frozen, Adam at lr 0.1 for 500 iterations (``nps.models.peers.mixture``: the fit, the user table,
the empty context).

Deviations from the release, besides the new-user fit's: ``fit`` trains on batches of tasks at its
own learning rate (the release's 0.5 applies to W and V alike, so set ``train.learning_rate``; no
ratio is needed); φ(y) is nps's option features, or with ``feature_dim > 0`` a learned two-layer
MLP of them (for raw options such as the synthetic tasks' scalars, on which a linear reward can only
prefer larger or smaller y; the release's φ is a frozen reward model's embedding).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nps.errors import invalid
from nps.layers import MLP
from nps.models.peers.mixture import UserMixtureModel, check_adaptation, logistic_loss

REWARD_SCALE = 1.0 / 100.0  # the release's division of φᵀVw by 100


@dataclasses.dataclass(frozen=True)
class LoReConfig:
    """LoRe; defaults from the release's TL;DR scripts (B is swept there over 0..6; 4 here)."""

    kind: str = "lore"
    num_basis: int = 4  # B, the rank of the reward basis
    # Rows of the training user table: at least the task's number of user types.
    num_users: int = 10
    feature_dim: int = 0  # 0: φ = the option features (the release); > 0: a learned MLP of this width
    feature_activation: str = "relu"
    user_learning_rate_ratio: float = 1.0  # the release trains W and V at one rate
    adapt_steps: int = 500
    adapt_learning_rate: float = 0.1

    def __post_init__(self):
        if self.kind != "lore":
            raise invalid("kind", self.kind, "must be 'lore' for a LoReConfig")
        if self.num_basis < 1:
            raise invalid("num_basis", self.num_basis, "must be a positive integer (B = 0, the reference reward "
                          "alone, is not a per-user model)")
        if self.feature_dim < 0:
            raise invalid("feature_dim", self.feature_dim, "cannot be negative; 0 uses the option features")
        check_adaptation(self)


class LoRe(UserMixtureModel):
    """r(y | mixture p) = φ(y)ᵀ V p / 100: the p-mixture of B basis rewards; BTL loss."""

    def __init__(self, option_dim: int, config: LoReConfig, *, rngs: nnx.Rngs):
        self.config = config
        if config.feature_dim:
            self.features = MLP(option_dim, config.feature_dim, config.feature_dim, config.feature_activation,
                                rngs=rngs)
            feature_dim = config.feature_dim
        else:
            self.features = None
            feature_dim = option_dim
        self.basis = nnx.Param(jax.random.normal(rngs.params(), (feature_dim, config.num_basis)))
        self.init_users(config.num_basis, rngs)

    pair_loss = staticmethod(logistic_loss)

    def basis_rewards(self, options: jax.Array) -> jax.Array:
        """r_b(y) = φ(y)ᵀ V_b / 100 for every basis vector: ``[..., D] -> [..., B]``."""
        features = options if self.features is None else self.features(options)
        return features @ self.basis[...] * REWARD_SCALE

    def embed(self, options: jax.Array) -> jax.Array:
        return self.basis_rewards(options)

    def score(self, embedded: jax.Array, mixture: jax.Array) -> jax.Array:
        return jnp.sum(embedded * mixture[..., None, :], axis=-1)
