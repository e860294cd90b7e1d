"""Next-token training of a decoder's base weights (pretraining or full fine-tuning).

Used to give the steering experiment's small LM its behaviours (the rest of nps keeps the base
frozen), and by ``nps plan`` for full fine-tuning at scale. It has ``fit``'s jit boundary: a
chunk of steps is one compiled ``lax.scan`` whose static arguments are only what shapes it (the
graph, the optimiser, the batch size, the mesh, the remat policy, the chunk's length); the seed's
key, the data and the state are arguments, and the state (weights and optimiser state) is donated.
Each step's batch is drawn in jit from ``fold_in(key, step)``, so the data depend on the step alone.
On a mesh the weights and their optimiser state are split by their logical axes
(``nps.lm.sharding``), each step's sequences over the batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from nps.config import check_positive
from nps.dpo import token_log_probs
from nps.errors import invalid
from nps.layers import BaseParam
from nps.lm.decoder import REMAT_POLICIES, Decoder
from nps.lm.sharding import constrain, on_mesh, shardings_of
from nps.train.distributed import put_global
from nps.train.loop import OptimizerConfig, optimizer_state_shardings
from nps.train.mesh import check_batch_divisible, replicated


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    log_every: int = 50
    remat: str = "none"  # what each block keeps for the backward pass (nps.lm.decoder.REMAT_POLICIES)

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "log_every")
        if self.learning_rate <= 0:
            raise invalid("learning_rate", self.learning_rate, "must be positive")
        if self.warmup_steps < 0:
            raise invalid("warmup_steps", self.warmup_steps, "must be non-negative")
        if self.remat not in REMAT_POLICIES:
            raise invalid("remat", self.remat, f"is unknown; use one of {list(REMAT_POLICIES)}")

    def optimizer_config(self) -> OptimizerConfig:
        """AdamW (no weight decay) with a linear warm-up and a cosine decay to 0 at the last step."""
        return OptimizerConfig(self.batch_size, 1, "adamw", self.learning_rate, 1e-8, 0.0, 0.0, self.warmup_steps,
                               "cosine", self.steps, "all_reduce")


class LMTrainState(NamedTuple):
    weights: Any  # every base weight (pure dict)
    opt_state: Any


def next_token_loss(model: Decoder, tokens: jax.Array, token_mask: jax.Array, remat: str = "none") -> jax.Array:
    """Mean −log p(token | prefix) over real tokens after the first; tokens [B, L], mask [B, L]."""
    hidden, _ = model.hidden_states(tokens, token_mask, remat=remat)
    log_probs = token_log_probs(model.logits_function(), hidden, tokens)
    scored = token_mask[:, 1:]
    return -jnp.sum(jnp.where(scored, log_probs, 0.0)) / jnp.maximum(jnp.sum(scored), 1)


@dataclasses.dataclass(frozen=True)
class NextTokenProgram:
    """What ``train_language_model`` compiles for one model and where its inputs live; ``nps plan``
    compiles the same chunk with abstract weights."""

    graphdef: Any
    optimizer: OptimizerConfig
    remat: str
    mesh: Mesh | None
    state_shardings: LMTrainState | None

    @classmethod
    def of(cls, model: Decoder, config: LMTrainConfig, mesh: Mesh | None):
        """The program, and the model's base weights and its other state (pure dicts)."""
        graphdef, weights_state, rest_state = nnx.split(model, BaseParam, ...)
        weights, rest = nnx.to_pure_dict(weights_state), nnx.to_pure_dict(rest_state)
        optimizer, shardings = config.optimizer_config(), None
        if mesh is not None:
            check_batch_divisible(mesh, config.batch_size, "pretrain.batch_size")
            weight_shardings = shardings_of(weights_state, mesh)
            shardings = LMTrainState(weight_shardings, optimizer_state_shardings(optimizer, weights, weight_shardings,
                                                                                  replicated(mesh)))
        return cls(graphdef, optimizer, config.remat, mesh, shardings), weights, rest

    def initial_state(self, weights) -> LMTrainState:
        init = self.optimizer.transformation().init
        abstract = any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(weights))
        return LMTrainState(weights, jax.eval_shape(init, weights) if abstract else init(weights))

    def place(self, state: LMTrainState, *data):
        """The state on its shardings and the data on every device (abstract leaves: attached)."""
        if self.mesh is None:
            return (state, *data)
        return put_global((state, *data), (self.state_shardings, *(replicated(self.mesh),) * len(data)))

    def static(self) -> dict[str, Any]:
        return {"graphdef": self.graphdef, "optimizer": self.optimizer, "remat": self.remat, "mesh": self.mesh}

    def lower_chunk(self, state, rest, tokens, token_mask, key, start, length: int):
        return _train_chunk.lower(state, rest, tokens, token_mask, key, start, length=length, **self.static())


def train_language_model(
    model: Decoder, tokens: jax.Array, token_mask: jax.Array, config: LMTrainConfig, mesh: Mesh | None = None
) -> tuple[Decoder, list[dict[str, float]]]:
    """Train every base weight of ``model`` on sequences [N, L]; returns the trained model and a loss log."""
    program, weights, rest = NextTokenProgram.of(model, config, mesh)
    state, tokens, token_mask = program.place(program.initial_state(weights), jnp.asarray(tokens),
                                              jnp.asarray(token_mask))
    key, history, done = jax.random.key(config.seed), [], 0
    while done < config.steps:
        length = min(config.log_every, config.steps - done)
        state, losses = _train_chunk(state, rest, tokens, token_mask, key, jnp.int32(done), length=length,
                                     **program.static())
        done += length
        history.append({"step": done, "loss": float(jnp.mean(losses))})
    return nnx.merge(program.graphdef, state.weights, rest), history


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "remat", "mesh", "length"),
                   donate_argnames=("state",))
def _train_chunk(state: LMTrainState, rest, tokens, token_mask, key, start, *, graphdef, optimizer: OptimizerConfig,
                 remat: str, mesh: Mesh | None, length: int):
    """``length`` steps from step ``start``: the state -> the same, and the losses [length]."""
    transformation = optimizer.transformation()

    def step(state: LMTrainState, index):
        rows = jax.random.randint(jax.random.fold_in(key, index), (optimizer.batch_size,), 0, tokens.shape[0])
        with on_mesh(mesh):
            batch = tuple(constrain(x[rows], ("activation_batch", "activation_length")) for x in (tokens, token_mask))
            value, grads = jax.value_and_grad(
                lambda weights: next_token_loss(nnx.merge(graphdef, weights, rest), *batch, remat))(state.weights)
        updates, opt_state = transformation.update(grads, state.opt_state, state.weights)
        return LMTrainState(optax.apply_updates(state.weights, updates), opt_state), value

    return jax.lax.scan(step, state, start + jnp.arange(length))
