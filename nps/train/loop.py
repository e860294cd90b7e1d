"""The training loop: an Optax train state, jit-compiled scans of steps, validation
with best-parameter tracking, and Orbax checkpoints that make a re-run resume.

Every random draw is keyed by ``fold_in(seed_key, step)``, so the data sampler's
state is the step counter: a run resumed from step s continues exactly as an
uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

from nps.config import config_to_dict
from nps.data.episodes import EpisodeSpec, PairPool, sample_episodes
from nps.errors import CheckpointError, ConfigError
from nps.likelihood import choice_accuracy, choice_nll
from nps.models.decoder import BaseParam
from nps.train.checkpoint import CheckpointStore
from nps.train.mesh import batch_sharding, check_batch_divisible, replicated


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (defaults: the paper's reward models, lr 1e-4, 64 tasks per batch)."""

    steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-4
    optimizer: str = "adam"  # "adam" or "adamw"
    adam_eps: float = 1e-8
    weight_decay: float = 0.0  # adamw only
    grad_clip_norm: float = 0.0  # 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (decays to 0 at `steps`)
    # Split each batch into this many equal micro-batches and average their gradients: the
    # same update as the whole batch, with one micro-batch's activations in memory.
    grad_accum_steps: int = 1
    # Validate every eval_every steps and keep the best parameters (the released code validates
    # every 7 iterations); checkpoint every checkpoint_every steps (a multiple of eval_every).
    eval_every: int = 20
    checkpoint_every: int = 100
    val_tasks: int = 512
    seed: int = 0

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "val_tasks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)} must be a positive integer")
        if self.checkpoint_every % self.eval_every:
            raise ConfigError(
                f"{prefix}.checkpoint_every={self.checkpoint_every} must be a multiple of "
                f"{prefix}.eval_every={self.eval_every} (a checkpoint follows a validation)"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"{prefix}.learning_rate={self.learning_rate} must be positive")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"{prefix}.optimizer={self.optimizer!r} is unknown; use 'adam' or 'adamw'")
        if self.warmup_steps < 0 or self.grad_clip_norm < 0 or self.weight_decay < 0:
            raise ConfigError(f"{prefix}: warmup_steps, grad_clip_norm and weight_decay cannot be negative")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"{prefix}.schedule={self.schedule!r} is unknown; use 'constant' or 'cosine'")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"{prefix}.grad_accum_steps={self.grad_accum_steps} must be a positive divisor of "
                f"{prefix}.batch_size={self.batch_size}"
            )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, config.warmup_steps, max(config.steps, config.warmup_steps + 1)
        )
    elif config.warmup_steps:
        schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    else:
        schedule = config.learning_rate
    if config.optimizer == "adamw":
        optimizer = optax.adamw(schedule, eps=config.adam_eps, weight_decay=config.weight_decay)
    else:
        optimizer = optax.adam(schedule, eps=config.adam_eps)
    if config.grad_clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer


class TrainState(NamedTuple):
    """Everything a resumed run needs; every leaf is an array (Orbax-friendly)."""

    step: jax.Array
    params: Any
    opt_state: Any
    best_params: Any
    best_val_loss: jax.Array
    best_step: jax.Array


@dataclasses.dataclass
class FitResult:
    graphdef: Any
    params: Any  # the best-by-validation trainable parameters
    best_step: int
    best_val_loss: float
    history: list[dict[str, float]]
    train_seconds: float  # wall-clock of this invocation's training (compile included)
    steps_per_second: float  # compiled train-step throughput, compile excluded
    frozen: Any = dataclasses.field(default_factory=dict)  # BaseParam weights (a pretrained LM); {} otherwise

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.frozen, self.params)


def _episode_loss(graphdef, frozen, params, episodes, key):
    return nnx.merge(graphdef, frozen, params).objective(episodes, key)


def fit(
    model: nnx.Module,
    train_pool: PairPool,
    val_pool: PairPool,
    spec: EpisodeSpec,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    *,
    run_config: dict[str, Any] | None = None,
    progress: bool = True,
    description: str = "train",
    mesh: jax.sharding.Mesh | None = None,
) -> FitResult:
    """Train ``model`` on episodes from ``train_pool``; keep the best validation NLL.

    With ``checkpoint_dir``, every ``checkpoint_every`` steps (and the last) are
    checkpointed, and a call on a folder that holds checkpoints resumes from the
    newest readable one.
    ``run_config`` (JSON-ready) is stored with the checkpoints; resuming with a
    different one is refused (``steps`` may grow, to train longer).
    With ``mesh`` (see ``nps.train.mesh``), each batch of tasks is split over the
    mesh's batch axes and the parameters are replicated: data parallelism under jit.
    A model's ``BaseParam`` weights (a pretrained decoder) are frozen: passed to every
    step as they are placed (e.g. sharded by ``from_pretrained(mesh=...)``), never
    updated nor checkpointed; put the base's identity in ``run_config`` so that a
    checkpoint refuses another base.
    """
    config.validate()
    spec.validate()
    if mesh is not None:
        check_batch_divisible(mesh, config.batch_size)
    graphdef, frozen, params = nnx.split(model, BaseParam, ...)
    frozen, params = nnx.to_pure_dict(frozen), nnx.to_pure_dict(params)
    data_key, model_key, val_key = jax.random.split(jax.random.key(config.seed), 3)
    fingerprint = dict(run_config or {}) | {
        "train": {k: v for k, v in config_to_dict(config).items() if k != "steps"},
        "episodes": config_to_dict(spec),
    }

    state = _initial_state(params, make_optimizer(config))
    history: list[dict[str, float]] = []
    store = CheckpointStore(checkpoint_dir) if checkpoint_dir is not None else None
    if store is not None:
        restored = store.restore_latest(state)
        if restored is not None:
            state, metadata = restored
            _check_same_run(metadata.get("fingerprint"), fingerprint, store.directory)
            history = list(metadata.get("history", []))
    if mesh is not None:
        state = jax.device_put(state, replicated(mesh))
        # The pools are step arguments: every device holds them (tasks are gathered in-jit).
        train_pool, val_pool = jax.device_put((train_pool, val_pool), replicated(mesh))

    val_episodes = _sample_validation(val_key, val_pool, spec, config.val_tasks)
    static = {"graphdef": graphdef, "spec": spec, "config": config, "mesh": mesh}

    start, step = time.perf_counter(), int(state.step)
    compiled_seconds, compiled_steps, compiled_lengths = 0.0, 0, set()
    bar = tqdm(total=config.steps, initial=min(step, config.steps), desc=description, disable=not progress, leave=False)
    while step < config.steps:
        length = min(config.eval_every - step % config.eval_every, config.steps - step)
        chunk_start = time.perf_counter()
        state, (losses, accuracies) = _train_chunk(state, frozen, train_pool, data_key, model_key, length=length, **static)
        state, val_loss, val_accuracy = _validate(state, frozen, val_episodes, graphdef=graphdef)
        val_loss = float(val_loss)  # syncs the device
        if length in compiled_lengths:  # no compilation in this chunk: time it
            compiled_seconds += time.perf_counter() - chunk_start
            compiled_steps += length
        compiled_lengths.add(length)
        step = int(state.step)
        history.append(
            {
                "step": step,
                "train_loss": float(jnp.mean(losses)),
                "train_accuracy": float(jnp.mean(accuracies)),
                "val_nll": val_loss,
                "val_unseen_accuracy": float(val_accuracy),
            }
        )
        bar.update(length)
        bar.set_postfix(val_nll=f"{val_loss:.4f}")
        if store is not None and (step % config.checkpoint_every == 0 or step == config.steps):
            metadata = {
                "fingerprint": fingerprint,
                "history": history,
                "sampler": {"seed": config.seed, "step": step},
            }
            store.save(step, state, metadata)
    bar.close()
    return FitResult(
        graphdef=graphdef,
        params=state.best_params,
        best_step=int(state.best_step),
        best_val_loss=float(state.best_val_loss),
        history=history,
        train_seconds=time.perf_counter() - start,
        steps_per_second=compiled_steps / compiled_seconds if compiled_seconds else float("nan"),
        frozen=frozen,
    )


# The step functions live at module level and take the pools as arguments (not closures), so
# their compilations are cached across ``fit`` calls: models of the same structure and shapes
# (several seeds, the BTL-DPO oracles) compile once.
def _loss_and_grads(frozen, params, episodes, model_key, graphdef, mesh):
    if mesh is not None:
        episodes = jax.lax.with_sharding_constraint(episodes, batch_sharding(mesh))
    (loss, aux), grads = jax.value_and_grad(_episode_loss, argnums=2, has_aux=True)(
        graphdef, frozen, params, episodes, model_key
    )
    return loss, aux["accuracy"], grads


def _train_step(state: TrainState, frozen, pool, data_key, model_key, *, graphdef, spec, config, mesh):
    step_data_key = jax.random.fold_in(data_key, state.step)
    step_model_key = jax.random.fold_in(model_key, state.step)
    episodes = sample_episodes(step_data_key, pool, spec, config.batch_size)
    accumulate = config.grad_accum_steps
    if accumulate == 1:
        loss, accuracy, grads = _loss_and_grads(frozen, state.params, episodes, step_model_key, graphdef, mesh)
    else:
        # The batch's tasks in `accumulate` equal slices: the mean of their gradients is the
        # whole batch's gradient, with one slice's activations in memory at a time.
        slices = jax.tree.map(lambda x: x.reshape(accumulate, -1, *x.shape[1:]), episodes)

        def micro_step(total, inputs):
            index, micro = inputs
            key = jax.random.fold_in(step_model_key, index)
            return jax.tree.map(jnp.add, total, _loss_and_grads(frozen, state.params, micro, key, graphdef, mesh)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
        total, _ = jax.lax.scan(micro_step, zeros, (jnp.arange(accumulate), slices))
        loss, accuracy, grads = jax.tree.map(lambda x: x / accumulate, total)
    updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), (loss, accuracy)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "config", "mesh", "length"))
def _train_chunk(state, frozen, pool, data_key, model_key, *, graphdef, spec, config, mesh, length):
    """``length`` training steps as one compiled scan."""
    step = functools.partial(_train_step, graphdef=graphdef, spec=spec, config=config, mesh=mesh)
    return jax.lax.scan(lambda s, _: step(s, frozen, pool, data_key, model_key), state, None, length=length)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample_validation(key, pool, spec, num_tasks):
    return sample_episodes(key, pool, spec, num_tasks)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _validate(state: TrainState, frozen, val_episodes, *, graphdef):
    """Validation NLL and unseen accuracy; keeps the best parameters so far."""
    log_odds = nnx.merge(graphdef, frozen, state.params).predict_log_odds(val_episodes, jax.random.key(0))
    val_loss = jnp.mean(choice_nll(log_odds, val_episodes.target_mask))
    val_accuracy = jnp.mean(choice_accuracy(log_odds, val_episodes.unseen_mask))
    improved = val_loss < state.best_val_loss
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(improved, a, b), new, old)  # noqa: E731
    state = state._replace(
        best_params=pick(state.params, state.best_params),
        best_val_loss=jnp.where(improved, val_loss, state.best_val_loss),
        best_step=jnp.where(improved, state.step, state.best_step),
    )
    return state, val_loss, val_accuracy


def _initial_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        opt_state=jax.jit(optimizer.init)(params),
        best_params=params,
        best_val_loss=jnp.asarray(jnp.inf, jnp.float32),
        best_step=jnp.asarray(0, jnp.int32),
    )


def load_trained(
    model: nnx.Module, checkpoint_dir: str | Path, config: TrainConfig, run_config: dict[str, Any] | None = None
) -> nnx.Module:
    """``model`` with the best-by-validation parameters that ``fit`` checkpointed in ``checkpoint_dir``.

    ``run_config``, when given, must match the one the run was trained with (e.g. the
    base LM's weights hash): adapters are never loaded onto another base.
    """
    graphdef, frozen, params = nnx.split(model, BaseParam, ...)
    template = _initial_state(nnx.to_pure_dict(params), make_optimizer(config))
    restored = CheckpointStore(checkpoint_dir).restore_latest(template)
    if restored is None:
        raise CheckpointError(f"{checkpoint_dir}: no checkpoint to load; train the model first")
    state, metadata = restored
    if run_config is not None:
        saved = {key: (metadata.get("fingerprint") or {}).get(key) for key in run_config}
        _check_same_run(saved, run_config, Path(checkpoint_dir))
    return nnx.merge(graphdef, frozen, state.best_params)


def _diff(saved: Any, current: Any, path: str = "") -> str | None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            found = _diff(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if saved == current else f"{path}: {saved!r} in the checkpoint, {current!r} now"


def _check_same_run(saved: Any, current: dict[str, Any], directory: Path) -> None:
    difference = _diff(saved, current)
    if difference:
        raise CheckpointError(
            f"the checkpoints in {directory} belong to a different configuration ({difference}); "
            "use another --out folder, or --fresh to discard them"
        )
