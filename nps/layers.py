"""Small Flax NNX building blocks shared by the encoder and the reward models."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from nps.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,  # the released code
    "gelu": jax.nn.gelu,  # the paper's text
    "silu": jax.nn.silu,
    "tanh": jax.nn.tanh,
}


def activation_fn(name: str, field: str = "activation") -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"{field}={name!r} is unknown; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """Linear → [LayerNorm] → activation → Linear (the paper's "two-layer MLP").

    ``[..., in] -> [..., out]``. ``layer_norm`` normalises each example's hidden
    layer on its own (never across the batch, which would mix users).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        activation: str,
        *,
        layer_norm: bool = False,
        rngs: nnx.Rngs,
    ):
        self.hidden = nnx.Linear(in_dim, hidden_dim, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden_dim, rngs=rngs) if layer_norm else None
        self.out = nnx.Linear(hidden_dim, out_dim, rngs=rngs)
        self.activation = activation_fn(activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.hidden(x)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return self.out(self.activation(hidden))
