"""Small Flax NNX building blocks shared by the encoder and the reward models."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nps.errors import invalid

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,  # the released code
    "gelu": jax.nn.gelu,  # the paper's text
    "silu": jax.nn.silu,
    "tanh": jax.nn.tanh,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.2),  # VPL's slope
}


def activation_fn(name: str, field: str = "activation") -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise invalid(field, name, f"is unknown; use one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class BaseParam(nnx.Variable):
    """A pretrained (frozen) weight: an ``nnx.Variable`` that is not an ``nnx.Param``.

    Everything trainable in nps is an ``nnx.Param`` (LoRA, FiLM, encoders, reward heads), so
    ``nnx.split(model, BaseParam, ...)`` separates what an optimiser may update from the base.
    """


def fan_in_uniform_bias(fan_in: int):
    """Initialiser drawing biases from U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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
        # Biases ~ U(±1/√fan_in) rather than 0: with low-dimensional inputs (the synthetic tasks'
        # scalar options) zero biases put every ReLU kink at the origin, and training must first
        # move them to where the rewards bend.
        self.hidden = nnx.Linear(in_dim, hidden_dim, bias_init=fan_in_uniform_bias(in_dim), rngs=rngs)
        self.norm = nnx.LayerNorm(hidden_dim, rngs=rngs) if layer_norm else None
        self.out = nnx.Linear(hidden_dim, out_dim, rngs=rngs)
        self.activation = activation_fn(activation)

    def activate(self, pre_activation: jax.Array) -> jax.Array:
        """[LayerNorm →] activation of the hidden layer's pre-activation."""
        if self.norm is not None:
            pre_activation = self.norm(pre_activation)
        return self.activation(pre_activation)

    def features(self, x: jax.Array) -> jax.Array:
        """The hidden layer's output ``[..., hidden]``."""
        return self.activate(self.hidden(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.features(x))


class DeepMLP(nnx.Module):
    """Linear layers through ``dims`` with ``activation`` between them (none after the last).

    ``[..., dims[0]] -> [..., dims[-1]]``; the peers' encoders and decoders, whose depth their
    releases fix (VPL's 2D→512→512→512, GPO's four-layer embedder).
    """

    def __init__(self, dims: Sequence[int], activation: str, *, rngs: nnx.Rngs):
        if len(dims) < 2:
            raise invalid("dims", dims, "needs an input and an output width")
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.activation = activation_fn(activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def compose_mlps(first: MLP, second: MLP, x: jax.Array, shift: jax.Array | float = 0.0) -> jax.Array:
    """``second(first(x))``, with ``shift`` added to ``second``'s hidden pre-activation.

    ``first.out`` and ``second.hidden`` are two linear maps in a row, so they are applied
    as one: x·(W₁W₂) + (b₁W₂ + b₂). The function and its gradients are the same; the
    product costs d·h·h once per call instead of rows·h·h per option row (a third of
    NP-BTL's and half of BTL's FLOPs per training step).
    """
    w1, b1 = first.out.kernel[...], first.out.bias[...]
    w2, b2 = second.hidden.kernel[...], second.hidden.bias[...]
    pre_activation = first.features(x) @ (w1 @ w2) + (b1 @ w2 + b2) + shift
    return second.out(second.activate(pre_activation))
