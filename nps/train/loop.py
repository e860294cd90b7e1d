"""The training loop: an Optax train state, jit-compiled scans of steps, validation with
best-parameter tracking, and Orbax checkpoints that make a re-run resume.

Every random draw is keyed by ``fold_in(seed_key, step)``, so the data sampler's state is
the step counter: a run resumed from step s continues exactly as an uninterrupted run would.

The jit boundary: a chunk of ``eval_every`` steps is one compiled ``lax.scan``. Static
arguments are only what shapes that program (the model's graph, the task shape, the
optimiser's settings, the mesh, the chunk length); the seed's keys, the pools and the state
are arguments, so models of one structure compile once however many seeds or users they are
trained for. The state is donated (a step replaces it in place), and each chunk moves its
metrics to the host once.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec
from flax import nnx

from nps.config import check_positive, config_to_dict
from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.pairs import OptionPairPool, PairPool
from nps.errors import CheckpointError, ConfigError, invalid
from nps.files import Digest
from nps.layers import BaseParam
from nps.likelihood import choice_accuracy, choice_nll
from nps.lm.sharding import on_mesh, shardings_of
from nps.models.interface import PreferenceModel, check_model
from nps.train.checkpoint import CheckpointStore
from nps.train.distributed import host_value, put_global
from nps.train.hooks import Checkpointing, Hook, Progress
from nps.train.logging import matmul_flops
from nps.train.mesh import BATCH_AXES, batch_shards, batch_sharding, check_batch_divisible, make_mesh, replicated


GRADIENT_SUMS = ("all_reduce", "ordered")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What shapes the compiled update: the optimiser, its schedule and the batch's micro-batching."""

    batch_size: int
    grad_accum_steps: int
    optimizer: str
    learning_rate: float
    adam_eps: float
    weight_decay: float
    grad_clip_norm: float
    warmup_steps: int
    schedule: str
    decay_steps: int  # the cosine schedule's length (0 for schedules that do not depend on it)
    gradient_sum: str  # how data-parallel devices' gradients meet: "all_reduce" or "ordered"

    def learning_rate_at(self, step: jax.Array) -> jax.Array:
        """The learning rate applied at ``step`` (the schedule's value)."""
        schedule = self.schedule_fn()
        return schedule(step) if callable(schedule) else jnp.asarray(schedule, jnp.float32)

    def schedule_fn(self) -> optax.Schedule | float:
        if self.schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0, self.learning_rate, self.warmup_steps, max(self.decay_steps, self.warmup_steps + 1))
        if self.warmup_steps:
            return optax.linear_schedule(0.0, self.learning_rate, self.warmup_steps)
        return self.learning_rate

    @functools.cache  # one transformation object per setting: a jit cache key, and no re-tracing
    def transformation(self) -> optax.GradientTransformation:
        schedule = self.schedule_fn()
        if self.optimizer == "adamw":
            optimizer = optax.adamw(schedule, eps=self.adam_eps, weight_decay=self.weight_decay)
        else:
            optimizer = optax.adam(schedule, eps=self.adam_eps)
        if self.grad_clip_norm:
            optimizer = optax.chain(optax.clip_by_global_norm(self.grad_clip_norm), optimizer)
        return optimizer


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
    # How the devices of a data-parallel mesh add their gradients: "all_reduce" (XLA's, whose
    # order follows the topology), or "ordered": gathered exactly and added in device order, so
    # that 1 process × 4 devices and 2 processes × 2 devices give bit-identical runs (memory and
    # traffic grow with the device count: for layout-equality tests, not for pods).
    gradient_sum: str = "all_reduce"
    # Validate every eval_every steps and keep the best parameters (the released code validates
    # every 7 iterations); checkpoint every checkpoint_every steps (a multiple of eval_every): a
    # killed run loses at most checkpoint_every steps of work.
    eval_every: int = 20
    checkpoint_every: int = 100
    val_tasks: int = 512
    seed: int = 0

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "eval_every", "checkpoint_every", "val_tasks")
        if self.checkpoint_every % self.eval_every:
            raise invalid("checkpoint_every", self.checkpoint_every,
                          f"must be a multiple of eval_every={self.eval_every} (a checkpoint follows a validation)")
        if self.learning_rate <= 0:
            raise invalid("learning_rate", self.learning_rate, "must be positive")
        if self.optimizer not in ("adam", "adamw"):
            raise invalid("optimizer", self.optimizer, "is unknown; use 'adam' or 'adamw'")
        for name in ("warmup_steps", "grad_clip_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise invalid(name, getattr(self, name), "cannot be negative")
        if self.schedule not in ("constant", "cosine"):
            raise invalid("schedule", self.schedule, "is unknown; use 'constant' or 'cosine'")
        if self.gradient_sum not in GRADIENT_SUMS:
            raise invalid("gradient_sum", self.gradient_sum, f"is unknown; use one of {list(GRADIENT_SUMS)}")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise invalid("grad_accum_steps", self.grad_accum_steps,
                          f"must be a positive divisor of batch_size={self.batch_size}")

    @property
    def schedule_uses_steps(self) -> bool:
        """The learning rate at a step depends on ``steps`` (cosine decays to 0 at the last step)."""
        return self.schedule == "cosine"

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            self.batch_size, self.grad_accum_steps, self.optimizer, self.learning_rate, self.adam_eps,
            self.weight_decay, self.grad_clip_norm, self.warmup_steps, self.schedule,
            self.steps if self.schedule_uses_steps else 0, self.gradient_sum,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must share with this config to be resumed by it: everything but ``steps``,
        which may grow, unless the schedule depends on it (then extending would not reproduce a run)."""
        fields = config_to_dict(self)
        if not self.schedule_uses_steps:
            del fields["steps"]
        return fields


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return config.optimizer_config().transformation()


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
    steps: int  # the steps the model has trained in all (resumed runs included)
    history: list[dict[str, float]]
    train_seconds: float  # wall-clock of this invocation's training (compile included)
    steps_per_second: float  # compiled train-step throughput, compile excluded
    frozen: Any = dataclasses.field(default_factory=dict)  # BaseParam weights (a pretrained LM); {} otherwise

    def model(self) -> PreferenceModel:
        """The trained model (best parameters, with its frozen base): what every public function takes."""
        return nnx.merge(self.graphdef, self.frozen, self.params)


def pools_digest(*pools: PairPool | OptionPairPool) -> str:
    """BLAKE2b-128 of the pools' arrays: the data a checkpoint was trained on, whatever the caller says."""
    digest = Digest()
    for leaf in jax.tree.leaves(host_value(pools)):
        digest.array(leaf)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """What ``fit`` compiles for one model and where its inputs live: the model's graph, the task
    shape, the optimiser, the mesh and the shardings of the train state and of the frozen base.

    ``fit`` runs these programs; ``nps plan`` compiles the same ones for a TPU or GPU topology
    with abstract weights (``jax.ShapeDtypeStruct`` leaves, from ``nnx.eval_shape``): every method
    takes real arrays and abstract ones alike.
    """

    graphdef: Any
    spec: EpisodeSpec
    optimizer: OptimizerConfig
    mesh: jax.sharding.Mesh | None
    state_shardings: TrainState | None  # None without a mesh
    frozen_shardings: Any

    @classmethod
    def of(cls, model: nnx.Module, spec: EpisodeSpec, config: TrainConfig, mesh: jax.sharding.Mesh | None):
        """The program for ``model`` on ``mesh``, and the model's frozen and trainable parameters
        (pure dicts). The trainable parameters, their optimiser state and the base are laid out by
        their logical axes (``nps.lm.sharding``): on a data-parallel mesh that is replicated; with
        fsdp or tensor axes, split."""
        optimizer = config.optimizer_config()
        if mesh is not None:
            check_batch_divisible(mesh, config.batch_size)
            check_batch_divisible(mesh, config.val_tasks, "train.val_tasks")
            if optimizer.gradient_sum == "ordered" and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
                raise ConfigError(f"train.gradient_sum=ordered needs a data-parallel mesh, "
                                  f"not fsdp={mesh.shape['fsdp']} × tensor={mesh.shape['tensor']}; use all_reduce",
                                  "train.gradient_sum")
        graphdef, frozen_state, params_state = nnx.split(model, BaseParam, ...)
        frozen, params = nnx.to_pure_dict(frozen_state), nnx.to_pure_dict(params_state)
        state_shardings = frozen_shardings = None
        if mesh is not None:
            param_shardings, whole = shardings_of(params_state, mesh), replicated(mesh)
            opt_shardings = optimizer_state_shardings(optimizer, params, param_shardings, whole)
            state_shardings = TrainState(whole, param_shardings, opt_shardings, param_shardings, whole, whole)
            frozen_shardings = shardings_of(frozen_state, mesh)
        return cls(graphdef, spec, optimizer, mesh, state_shardings, frozen_shardings), frozen, params

    def static(self) -> dict[str, Any]:
        """The static arguments of the train step and chunk (what shapes their program)."""
        return {"graphdef": self.graphdef, "spec": self.spec, "optimizer": self.optimizer, "mesh": self.mesh}

    def initial_state(self, params) -> TrainState:
        """The state before the first step (abstract for abstract parameters)."""
        if _is_abstract(params):
            return jax.eval_shape(functools.partial(_initial_state, optimizer=self.optimizer), params)
        return _initial_state(params, optimizer=self.optimizer)

    def place(self, state: TrainState, frozen, *pools):
        """(state, frozen, *pools) on their shardings; abstract leaves get their sharding attached.

        A pool's pairs are on every device. A policy's options table (token rows and features, the
        bulk of the data: UltraFeedback HH's at 512 tokens and 4,096-d features is 1.2 GB) is split
        by rows over the batch axes, its rows padded to a multiple of the shards with copies of its
        last row (no pair names them): each device stores 1/shards of it, and a step's gather of
        its tasks' rows costs one small all-reduce.
        """
        if self.mesh is None:
            return (put_global(state, jax.sharding.SingleDeviceSharding(jax.devices()[0])), frozen, *pools)
        whole = replicated(self.mesh)
        rows = batch_sharding(self.mesh)
        pools = tuple(_rows_padded(pool, batch_shards(self.mesh)) for pool in pools)
        layouts = tuple(OptionPairPool(whole, rows) if isinstance(pool, OptionPairPool) else whole for pool in pools)
        return put_global((state, frozen, *pools), (self.state_shardings, self.frozen_shardings, *layouts))

    def validation_static(self) -> dict[str, Any]:
        """The static arguments of validation: tasks split over the mesh, unless the ordered sum asks
        for layout-independent numbers."""
        split = self.mesh is not None and self.mesh.size > 1 and self.optimizer.gradient_sum == "all_reduce"
        return {"graphdef": self.graphdef, "mesh": self.mesh, "split_tasks": split}

    def step_flops(self, state, frozen, pool, data_key, model_key) -> float:
        """Matmul FLOPs of one training step as written (global: before any partitioning), counted
        from its jaxpr (``nps.train.logging.matmul_flops``)."""
        return matmul_flops(functools.partial(_train_step, **self.static()), state, frozen, pool, data_key, model_key)

    def lower_chunk(self, state, frozen, pool, data_key, model_key, length: int):
        """The chunk of ``length`` steps that ``fit`` runs, lowered for these inputs (call ``.compile()``)."""
        return _train_chunk.lower(state, frozen, pool, data_key, model_key, length=length, **self.static())


def optimizer_state_shardings(optimizer: OptimizerConfig, params, param_shardings, other):
    """The shardings of ``optimizer``'s state for ``params``: each copy of the parameters in it (Adam's
    moments) as the parameters, everything else (step counts) ``other``."""
    transformation = optimizer.transformation()
    return optax.tree_utils.tree_map_params(transformation, lambda _, sharding: sharding,
                                            jax.eval_shape(transformation.init, params), param_shardings,
                                            transform_non_params=lambda _: other)


def _rows_padded(pool, multiple: int):
    """An ``OptionPairPool`` whose options table has a multiple of ``multiple`` rows (its last row
    repeated); any other pool as it is."""
    if not isinstance(pool, OptionPairPool):
        return pool

    def pad(table):
        extra = -table.shape[0] % multiple
        if isinstance(table, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((table.shape[0] + extra, *table.shape[1:]), table.dtype)
        return jnp.concatenate([table, jnp.repeat(table[-1:], extra, axis=0)]) if extra else table

    return pool._replace(options=jax.tree.map(pad, pool.options))


def _is_abstract(tree) -> bool:
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What a chunk of steps did, on the host: its steps ``first + 1 .. step``, its history entry's
    metrics (train means, validation), the tokens a step read (token models; else None), its wall
    clock, and whether it is throughput (it compiled nothing and no hook disturbed it)."""

    first: int
    step: int
    metrics: dict[str, float]
    tokens: float | None
    seconds: float
    timed: bool

    @property
    def length(self) -> int:
        return self.step - self.first


@dataclasses.dataclass
class Run:
    """One ``fit`` call as it goes: its program, state, data and keys, the step it has reached and
    its history; what hooks read (``nps.train.hooks``)."""

    program: TrainProgram
    config: TrainConfig
    state: TrainState
    frozen: Any
    pool: Any
    keys: tuple[jax.Array, jax.Array, jax.Array]  # data, model, validation
    val_episodes: Any
    step: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    lengths: set[int] = dataclasses.field(default_factory=set)  # scan lengths this run has compiled
    precompiled: dict[int, Any] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    timed_seconds: float = 0.0
    timed_steps: int = 0

    @classmethod
    def start(cls, model, train_pool, val_pool, spec: EpisodeSpec, config: TrainConfig, mesh) -> Run:
        """``model`` placed for training on ``mesh``. Everything is placed before anything is
        restored into it: the state by its logical axes (on a data-parallel mesh: replicated), the
        base likewise (one already placed by ``from_pretrained(mesh=...)`` keeps its arrays), the
        pools on every device (an options table split by rows). Without a mesh the state is
        committed to the first device from the start, as every chunk's output is: the first
        chunk's compilation serves them all."""
        program, frozen, params = TrainProgram.of(model, spec, config, mesh)
        data_key, model_key, val_key = jax.random.split(jax.random.key(config.seed), 3)
        state, frozen, train_pool, val_pool = program.place(program.initial_state(params), frozen, train_pool,
                                                            val_pool)
        val_episodes = sample_episodes(val_key, val_pool, spec, config.val_tasks)
        return cls(program, config, state, frozen, train_pool, (data_key, model_key, val_key), val_episodes)

    def resume(self, store: CheckpointStore, fingerprint: dict[str, Any]) -> None:
        """Continue from the newest verified checkpoint in ``store`` of this run (the fingerprint
        says so), if there is one."""
        restored = store.restore_latest(
            self.state, accept=lambda metadata: _check_same_run(metadata.get("fingerprint"), fingerprint,
                                                                store.directory))
        if restored is not None:
            self.state, metadata = restored
            self.history = list(metadata.get("history", []))
            self.step = int(host_value(self.state.step))
            _check_not_beyond(self.step, self.config.steps, store.directory)

    def args(self) -> tuple:
        """The arguments of a training scan."""
        return self.state, self.frozen, self.pool, *self.keys[:2]

    def step_flops(self) -> float:
        return self.program.step_flops(*self.args())

    def precompile(self, length: int) -> None:
        """Compile the scan of ``length`` steps now (a profiler's trace starts after it)."""
        self.precompiled[length] = self.program.lower_chunk(*self.args(), length=length).compile()

    def train_chunk(self, hooks: Sequence[Hook]) -> Chunk:
        """The steps up to the next validation, as scans that end where a hook asks, then validation
        and the chunk's one host transfer."""
        first, every = self.step, self.config.eval_every
        last = min(first + every - first % every, self.config.steps)
        ends = {last, *(end for hook in hooks for end in hook.scan_ends(first, last) if first < end < last)}
        started, parts, timed = time.perf_counter(), [], True
        for end in sorted(ends):
            length = end - self.step
            new = length not in self.lengths
            self.lengths.add(length)
            disturbed = [hook.before_scan(self, length, new) for hook in hooks]
            timed &= not (new or any(disturbed))  # a chunk that compiled, or was traced, is not throughput
            scan = self.precompiled.pop(length, None) or functools.partial(_train_chunk, length=length,
                                                                            **self.program.static())
            self.state, part = scan(*self.args())
            parts.append(part)
            self.step = end
            for hook in hooks:
                hook.after_scan(self)
        self.state, val_metrics = _validate(self.state, self.frozen, self.val_episodes, self.keys[2],
                                            **self.program.validation_static())
        metrics = host_value(_chunk_means(tuple(parts)) | val_metrics)  # the chunk's one host transfer
        metrics = {name: float(value) for name, value in metrics.items()}
        tokens = metrics.pop("tokens", None)
        self.history.append({"step": self.step} | metrics)
        seconds = time.perf_counter() - started
        if timed:
            self.timed_seconds, self.timed_steps = self.timed_seconds + seconds, self.timed_steps + self.step - first
        return Chunk(first, self.step, self.history[-1], tokens, seconds, timed)

    def result(self) -> FitResult:
        best_step, best_val_loss = host_value((self.state.best_step, self.state.best_val_loss))
        return FitResult(
            graphdef=self.program.graphdef,
            params=self.state.best_params,
            best_step=int(best_step),
            best_val_loss=float(best_val_loss),
            steps=self.step,
            history=self.history,
            train_seconds=time.perf_counter() - self.started,
            steps_per_second=self.timed_steps / self.timed_seconds if self.timed_seconds else float("nan"),
            frozen=self.frozen,
        )


def check_rates_told(model, config: TrainConfig) -> None:
    """A model whose parameter groups learn at absolute rates (PAL: ``nps.models.peers.mixture.rated_param``)
    scales them by its config's ``train_learning_rate``: that must be the rate ``fit`` trains at, or every
    group learns at another rate than its config says, silently."""
    told = getattr(getattr(model, "config", None), "train_learning_rate", None)
    if told is not None and told != config.learning_rate:
        raise invalid("train.learning_rate", config.learning_rate,
                      f"differs from the model config's train_learning_rate={told}, to which its parameter groups' "
                      f"rates are relative; build the model with train_learning_rate={config.learning_rate} "
                      "(nps.models.peers.told_the_run)")


def fit(
    model: PreferenceModel,
    train_pool: PairPool | OptionPairPool,
    val_pool: PairPool | OptionPairPool,
    spec: EpisodeSpec,
    config: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    *,
    run_config: dict[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    hooks: Sequence[Hook] = (),
    progress: bool = True,
    description: str = "train",
) -> FitResult:
    """Train any preference model (``nps.models.interface``) on episodes from ``train_pool``: it
    minimises ``model.objective``, validates on ``predict_log_odds``; keep the best validation NLL.

    With ``checkpoint_dir``, every ``checkpoint_every`` steps (and the last) are checkpointed,
    and a call on a folder that holds checkpoints resumes from the newest verified one.
    ``run_config`` (JSON-ready) is stored with the checkpoints next to the train config, the
    episode spec and a digest of the pools; resuming under a different one is refused
    (``steps`` may grow, to train longer, unless the schedule depends on it).
    With ``mesh`` (see ``nps.train.mesh``; default: every device, data-parallel), each batch of
    tasks is split over the mesh's batch axes and every weight by its logical axes.
    A model's ``BaseParam`` weights (a pretrained decoder) are frozen: passed to every step as
    they are placed, never updated nor checkpointed; put the base's identity in ``run_config`` so
    that a checkpoint refuses another base.
    ``hooks`` (``nps.train.hooks``: a metrics log, a profiler window) run at chunk boundaries,
    before the progress bar and checkpointing.
    """
    check_model(model)
    check_rates_told(model, config)
    if mesh is None and jax.device_count() > 1:
        mesh = make_mesh()  # several devices (of one process or many): data-parallel over all of them
    run = Run.start(model, train_pool, val_pool, spec, config, mesh)
    hooks = [*hooks, Progress(description, progress)]
    if checkpoint_dir is not None:
        fingerprint = dict(run_config or {}) | {
            "train": config.fingerprint(),
            "episodes": config_to_dict(spec),
            "pools": pools_digest(train_pool, val_pool),  # the data as given (placement may pad a table)
        }
        store = CheckpointStore(checkpoint_dir)
        run.resume(store, fingerprint)
        hooks.append(Checkpointing(store, fingerprint))
    for hook in hooks:
        hook.begin_run(run)
    while run.step < config.steps:
        chunk = run.train_chunk(hooks)
        for hook in hooks:
            hook.after_chunk(run, chunk)
    for hook in hooks:
        hook.end_run(run)
    return run.result()


# The step functions live at module level and take the pools and keys as arguments (not closures),
# so their compilations are cached across ``fit`` calls: models of the same structure and shapes
# (several seeds, the BTL-DPO oracles) compile once.
def _episode_loss(graphdef, frozen, params, episodes, key, step=None):
    """The model's objective on ``episodes``; a model whose objective follows the training step (a KL
    annealing schedule) says so with ``objective_reads_step = True`` and gets ``step`` too."""
    model = nnx.merge(graphdef, frozen, params)
    if getattr(model, "objective_reads_step", False):
        return model.objective(episodes, key, step=step)
    return model.objective(episodes, key)


def _loss_and_grads(frozen, params, episodes, model_key, step, graphdef, mesh, gradient_sum):
    if mesh is not None and mesh.size > 1:
        episodes = _tasks_split(episodes, mesh)
        if gradient_sum == "ordered":
            return _data_parallel_loss_and_grads(frozen, params, episodes, model_key, step, graphdef, mesh)
    # The step as written, with the step's own key: XLA partitions it over the mesh (each device its
    # tasks, the activations laid out by their logical axes) and sums the gradients (an all-reduce,
    # or a reduce-scatter into split parameters).
    with on_mesh(mesh):
        (loss, aux), grads = jax.value_and_grad(_episode_loss, argnums=2, has_aux=True)(
            graphdef, frozen, params, episodes, model_key, step)
    return loss, aux["accuracy"], grads


def _tasks_split(episodes, mesh):
    """Episodes with their tasks (leading axis) split over the mesh's batch axes."""
    return jax.lax.with_sharding_constraint(episodes, batch_sharding(mesh))


def _data_parallel_loss_and_grads(frozen, params, episodes, model_key, step, graphdef, mesh):
    """Each device's loss and gradients on its tasks, summed in device order on every device
    (``train.gradient_sum=ordered``).

    The devices' contributions are gathered (exact) and added in one fixed order, never by an
    all-reduce whose order depends on the topology: 1 process × 4 devices and 2 processes × 2
    devices give bit-identical updates. Each device's tasks draw model randomness from the step's
    key folded with the device's position on the batch axis, so runs with the same number of
    batch shards are bit-identical, and runs with different numbers draw different (equally
    distributed) latent samples and dropout masks.
    """
    axis = BATCH_AXES
    replicated_spec, batch_spec = PartitionSpec(), PartitionSpec(axis)

    def per_device(frozen, params, episodes, key, step):
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        (loss, aux), grads = jax.value_and_grad(_episode_loss, argnums=2, has_aux=True)(
            graphdef, frozen, params, episodes, key, step)
        gathered = jax.lax.all_gather((loss, aux["accuracy"], grads), axis)  # [devices, ...] in device order
        devices = jax.tree.leaves(gathered)[0].shape[0]
        return jax.tree.map(lambda x: functools.reduce(jnp.add, list(x)) / devices, gathered)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(replicated_spec, replicated_spec, batch_spec,
                                                          replicated_spec, replicated_spec),
                         out_specs=replicated_spec, check_vma=False)(frozen, params, episodes, model_key, step)


def _tokens(episodes) -> jax.Array | None:
    """Real tokens the policy reads per step (its targets' chosen and rejected sequences), or None."""
    masks = [getattr(side, "token_mask", None) for side in (episodes.target_chosen, episodes.target_rejected)]
    return None if masks[0] is None else sum(jnp.sum(mask, dtype=jnp.float32) for mask in masks)


def _train_step(state: TrainState, frozen, pool, data_key, model_key, *, graphdef, spec, optimizer, mesh):
    step_data_key = jax.random.fold_in(data_key, state.step)
    step_model_key = jax.random.fold_in(model_key, state.step)
    episodes = sample_episodes(step_data_key, pool, spec, optimizer.batch_size)
    accumulate = optimizer.grad_accum_steps
    if accumulate == 1:
        loss, accuracy, grads = _loss_and_grads(frozen, state.params, episodes, step_model_key, state.step,
                                                graphdef, mesh, optimizer.gradient_sum)
    else:
        # The batch's tasks in `accumulate` equal slices: the mean of their gradients is the
        # whole batch's gradient, with one slice's activations in memory at a time.
        slices = jax.tree.map(lambda x: x.reshape(accumulate, -1, *x.shape[1:]), episodes)

        def micro_step(total, inputs):
            index, micro = inputs
            key = jax.random.fold_in(step_model_key, index)
            micro_grads = _loss_and_grads(frozen, state.params, micro, key, state.step, graphdef, mesh,
                                          optimizer.gradient_sum)
            return jax.tree.map(jnp.add, total, micro_grads), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
        total, _ = jax.lax.scan(micro_step, zeros, (jnp.arange(accumulate), slices))
        loss, accuracy, grads = jax.tree.map(lambda x: x / accumulate, total)
    updates, opt_state = optimizer.transformation().update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train_loss": loss, "train_accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               "learning_rate": optimizer.learning_rate_at(state.step)}
    tokens = _tokens(episodes)
    if tokens is not None:
        metrics["tokens"] = tokens
    return state._replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "optimizer", "mesh", "length"),
                   donate_argnames=("state",))
def _train_chunk(state, frozen, pool, data_key, model_key, *, graphdef, spec, optimizer, mesh, length):
    """``length`` training steps as one compiled scan; each metric per step ([length]; ``_chunk_means`` reduces)."""
    step = functools.partial(_train_step, graphdef=graphdef, spec=spec, optimizer=optimizer, mesh=mesh)
    return jax.lax.scan(lambda s, _: step(s, frozen, pool, data_key, model_key), state, None, length=length)


@jax.jit
def _chunk_means(parts: tuple[dict[str, jax.Array], ...]) -> dict[str, jax.Array]:
    """A chunk's metrics from its scans' per-step values: means over its steps, the rate at the last.
    One reduction however the chunk was split (averaging the parts' means would add its own rounding).
    A split chunk's parameters and losses equal an unsplit one's; a gradient norm reduced inside
    another scan's program may differ in the last bit."""
    values = {name: jnp.concatenate([part[name] for part in parts]) for name in parts[0]}
    return {name: series[-1] if name == "learning_rate" else jnp.mean(series) for name, series in values.items()}


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "split_tasks"), donate_argnames=("state",))
def _validate(state: TrainState, frozen, val_episodes, key, *, graphdef, mesh, split_tasks):
    """Validation NLL and unseen accuracy; keeps the best parameters so far. ``split_tasks``: each
    device its tasks (the default); else every device all of them, so that the means do not depend
    on the layout (``train.gradient_sum=ordered``)."""
    if split_tasks:
        val_episodes = _tasks_split(val_episodes, mesh)
    with on_mesh(mesh if split_tasks else None):
        log_odds = nnx.merge(graphdef, frozen, state.params).predict_log_odds(val_episodes, key)
    val_loss = jnp.mean(choice_nll(log_odds, val_episodes.target_mask))
    val_accuracy = jnp.mean(choice_accuracy(log_odds, val_episodes.unseen_mask))
    improved = val_loss < state.best_val_loss
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(improved, a, b), new, old)  # noqa: E731
    state = state._replace(
        best_params=pick(state.params, state.best_params),
        best_val_loss=jnp.where(improved, val_loss, state.best_val_loss),
        best_step=jnp.where(improved, state.step, state.best_step),
    )
    return state, {"val_nll": val_loss, "val_unseen_accuracy": val_accuracy}


@functools.partial(jax.jit, static_argnames=("optimizer",))
def _initial_state(params, *, optimizer: OptimizerConfig) -> TrainState:
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        opt_state=optimizer.transformation().init(params),
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
    template = _initial_state(nnx.to_pure_dict(params), optimizer=config.optimizer_config())
    directory = Path(checkpoint_dir)

    def accept(metadata: dict[str, Any]) -> None:
        if run_config is not None:
            saved = {key: (metadata.get("fingerprint") or {}).get(key) for key in run_config}
            _check_same_run(saved, run_config, directory)

    restored = CheckpointStore(directory).restore_latest(template, accept)
    if restored is None:
        raise CheckpointError(f"{checkpoint_dir}: no checkpoint to load; train the model first")
    state, _ = restored
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
            "use another --out folder, or the checkpoints' configuration to resume them (they verify: kept)"
        )


def _check_not_beyond(trained: int, steps: int, directory: Path) -> None:
    """A run asked for fewer steps than its checkpoint holds would report a model it did not ask for."""
    if trained > steps:
        raise ConfigError(
            f"train.steps={steps}, but the checkpoint in {directory} has trained {trained} steps; "
            f"use another --out to train {steps} steps, or set train.steps >= {trained} (the checkpoint is kept)",
            "train.steps",
        )
