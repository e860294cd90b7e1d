"""Next-token training of a decoder's base weights (pretraining or full fine-tuning).

Used to give the steering experiment's small LM its behaviours; the rest of nps
keeps the base frozen. Batches are drawn inside jit, steps run as ``lax.scan`` chunks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nps.dpo import token_log_probs
from nps.config import check_positive
from nps.errors import invalid
from nps.layers import BaseParam
from nps.lm.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "log_every")
        if self.learning_rate <= 0:
            raise invalid("learning_rate", self.learning_rate, "must be positive")
        if self.warmup_steps < 0:
            raise invalid("warmup_steps", self.warmup_steps, "must be non-negative")


def next_token_loss(model: Decoder, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Mean −log p(token | prefix) over real tokens after the first; tokens [B, L], mask [B, L]."""
    hidden, _ = model.hidden_states(tokens, token_mask)
    log_probs = token_log_probs(model.logits, hidden, tokens)
    scored = token_mask[:, 1:]
    return -jnp.sum(jnp.where(scored, log_probs, 0.0)) / jnp.maximum(jnp.sum(scored), 1)


def train_language_model(
    model: Decoder, tokens: jax.Array, token_mask: jax.Array, config: LMTrainConfig
) -> tuple[Decoder, list[dict[str, float]]]:
    """Train every base weight of ``model`` on sequences [N, L]; returns the trained model and a loss log."""
    graphdef, base, rest = nnx.split(model, BaseParam, ...)
    base, rest = nnx.to_pure_dict(base), nnx.to_pure_dict(rest)
    tokens, token_mask = jnp.asarray(tokens), jnp.asarray(token_mask)
    carry, history, done = (base, _optimizer(config).init(base)), [], 0
    while done < config.steps:
        length = min(config.log_every, config.steps - done)
        carry, losses = _train_chunk(carry, jnp.int32(done), rest, tokens, token_mask, graphdef=graphdef,
                                     config=config, length=length)
        done += length
        history.append({"step": done, "loss": float(jnp.mean(losses))})
    return nnx.merge(graphdef, carry[0], rest), history


def _optimizer(config: LMTrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps, config.steps)
    return optax.adamw(schedule, weight_decay=0.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "length"))
def _train_chunk(carry, start, rest, tokens, token_mask, *, graphdef, config: LMTrainConfig, length: int):
    """``length`` steps from step ``start``: (base weights, optimiser state) -> the same, and the losses [length].

    Each step's batch is drawn in jit from ``fold_in(seed, step)``, so the data depend on the step alone.
    """
    optimizer, data_key = _optimizer(config), jax.random.key(config.seed)

    def step(carry, index):
        base, opt_state = carry
        rows = jax.random.randint(jax.random.fold_in(data_key, index), (config.batch_size,), 0, tokens.shape[0])
        loss, grads = jax.value_and_grad(
            lambda b: next_token_loss(nnx.merge(graphdef, b, rest), tokens[rows], token_mask[rows])
        )(base)
        updates, opt_state = optimizer.update(grads, opt_state, base)
        return (optax.apply_updates(base, updates), opt_state), loss

    return jax.lax.scan(step, carry, start + jnp.arange(length))
