"""`nps reproduce peers`: nps's reward models and the peer methods (VPL, GPO and every model in
``nps.models.peers.PEER_MODELS``) on the same tasks, the same episodes and the same unseen-target
evaluation, with a per-type oracle and the population BTL as references. The tasks: synthetic ones
(exact ground truth, the defaults), the steering reward task (``--set tasks=steering``: the steering
experiment's pairs of base samples, options as the base's hidden states) and VPL's UltraFeedback recipes
UF-P-2 and UF-P-4 on a frozen embedder's option features (``--data ULTRAFEEDBACK --model EMBEDDER
--set tasks=uf-p-2,uf-p-4``).

For each task and method: each learning rate of one grid, the same for every method, trains the first
seed and the lowest validation NLL picks the rate (no method is tuned on test tasks); the remaining seeds
train at that rate. Reported per method: unseen-target accuracy per N^C and user type, the mean ± s.e.
over seeds; training wall clock; learned parameters; and the wall clock of adapting to one new user
(``nps.train.costs``), with whether that takes gradient steps. The per-type oracle is one BTL per user
type trained on that type's labels alone, scored on that type's users, at the rate picked for the BTL.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax

from nps.config import check_models, config_to_dict
from nps.data.episodes import EpisodeSpec, sample_episodes
from nps.data.pairs import check_splittable, oracle_pools
from nps.data.synthetic import (
    IDEAL_POINT_NAMES,
    TWO_USER_NAMES,
    bayes_error_single_pair,
    conflicting_probe_pairs,
    correlated_identity,
    correlated_pools,
    ideal_point_identity,
    ideal_point_pools,
    two_user_identity,
    two_user_pools,
)
from nps.errors import invalid
from nps.experiments.steering import trained_run
from nps.experiments.ultrafeedback import UFRewardConfig, prepare_inputs, uf_pools
from nps.files import atomic_write_text
from nps.models.peers import PEER_MODELS, GPOConfig, LoReConfig, PALConfig, VPLConfig, told_the_run
from nps.models.peers.vpl import active_latent_units
from nps.models.reward import SYNTHETIC_NP_BTL, RewardModelConfig
from nps.results import experiment_run, plot_accuracy_vs_context
from nps.train.costs import adaptation_seconds_per_user, parameter_count
from nps.train.evaluate import (
    EvalConfig,
    check_unseen_targets,
    identification_errors,
    mean_and_sem,
    summarise_over_seeds,
)
from nps.train.logging import LogConfig
from nps.train.loop import TrainConfig

NPS_METHODS = ("btl", "dpl", "np_btl")
METHOD_NAMES = NPS_METHODS + tuple(PEER_MODELS)
ORACLE = "per_type_oracle"
ADAPTATION_CONTEXT = 10  # N^C of the new users whose adaptation is timed

# The correlation study's task at one ρ (§5.2): options [h0, h1] correlated by ρ, user k's reward h_k.
CORRELATED_RHO = -0.7
Z_ERROR_TASKS, Z_ERROR_PROBES = 2000, 32

# task name -> (pools of (num_pairs, seed), the data's identity, user type names)
TASKS: dict[str, tuple[Callable[..., dict], Callable[..., dict], list[str]]] = {
    "two-user": (two_user_pools, two_user_identity, TWO_USER_NAMES),
    "four-ideal-points": (ideal_point_pools, ideal_point_identity, IDEAL_POINT_NAMES),
    "correlated": (functools.partial(correlated_pools, CORRELATED_RHO),
                   functools.partial(correlated_identity, CORRELATED_RHO), TWO_USER_NAMES),
}
# VPL's UltraFeedback recipes: prepared from --data and embedded by --model as `nps reproduce hh` does.
UF_TASKS = ("uf-p-2", "uf-p-4")
# The steering experiment's pairs, options as its encoder's features: `steering_run`, or one trained under <out>.
STEERING_TASK = "steering"
DEFAULT_TASKS = ("two-user", "four-ideal-points")


@dataclasses.dataclass(frozen=True)
class PeersConfig:
    """Defaults sized for a 2-core CPU within 30 minutes: 300 steps of 64 tasks per run, three seeds,
    one learning-rate grid of two rates for every method; each model at its release's defaults but for:

    - PAL-A and PAL-B: a preference space of d = 128, not the release's 512, at which PAL-B's seeds trained
      4-16 times as long here and both new-user fits, which validation runs every ``eval_every`` steps,
      cost more (PAL-A's runs the projector each fitting step); docs/peers.md compares PAL-B at both.
      Each is told the task's number of user types (``num_users``) and the grid's rate
      (``train_learning_rate``), so its user weights and prototypes learn at the release's 5e-3 and
      PAL-B's logit scale at 0.1 whichever rate the grid picks for the projectors.
    - LoRe: φ a learned MLP of width 64 of the options (``feature_dim``): the synthetic options are
      scalars or points in the plane, on which the release's linear φ(y)ᵀVw can only rank along a line.
      Told the task's number of user types; W and V train at the grid's rate (the release's 0.5 is
      for its linear model and full-batch training).
    """

    # add "correlated" for the correlation study's Bayes reference, "steering" for the steering reward task,
    # "uf-p-2" / "uf-p-4" for UltraFeedback
    tasks: tuple[str, ...] = DEFAULT_TASKS
    methods: tuple[str, ...] = METHOD_NAMES
    oracle: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    learning_rates: tuple[float, ...] = (3e-4, 1e-3)
    num_pairs: int = 20_000
    data_seed: int = 0
    episodes: EpisodeSpec = EpisodeSpec()
    train: TrainConfig = TrainConfig(steps=300, eval_every=50, checkpoint_every=300)
    eval: EvalConfig = EvalConfig(num_tasks=1000)
    log: LogConfig = LogConfig()
    btl: RewardModelConfig = RewardModelConfig(kind="btl")
    dpl: RewardModelConfig = RewardModelConfig(kind="dpl")
    np_btl: RewardModelConfig = SYNTHETIC_NP_BTL
    vpl: VPLConfig = VPLConfig()
    gpo: GPOConfig = GPOConfig()
    pal_a: PALConfig = PALConfig(kind="pal-a", dim=128)
    pal_b: PALConfig = PALConfig(kind="pal-b", dim=128)
    lore: LoReConfig = LoReConfig(feature_dim=64)
    # The UltraFeedback tasks' inputs (as `nps reproduce hh`'s): the train file or a prepared folder, and
    # the frozen embedder whose last-token states are the options' features.
    data: str = ""
    model: str = ""
    steering_run: str = ""  # the steering task's `nps reproduce steering` folder; "" trains one under <out>/steering
    dtype: str = "bfloat16"
    embed_max_length: int = 1024
    embed_batch_size: int = 16

    def __post_init__(self):
        check_models(self.tasks, (*TASKS, STEERING_TASK, *UF_TASKS), "tasks")
        uf_tasks = [task for task in self.tasks if task in UF_TASKS]
        if uf_tasks and not (self.data and self.model):
            raise invalid("tasks", ",".join(uf_tasks), "need --data (UltraFeedback's train file or a prepared "
                          "folder) and --model (the embedder's directory)")
        for uf_task in uf_tasks:
            self.uf_inputs(uf_task)  # its recipe and sizes checked now, not after the synthetic tasks trained
        check_models(self.methods, METHOD_NAMES, "methods")
        check_splittable(self.num_pairs)
        check_unseen_targets(self.eval.context_sizes, self.episodes)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise invalid("seeds", self.seeds, "must be distinct seeds, at least one")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise invalid("learning_rates", self.learning_rates, "must be positive rates, at least one")

    def uf_inputs(self, task: str) -> UFRewardConfig:
        """What ``prepare_inputs`` reads for the UltraFeedback task ``task`` (its recipe, this config's inputs)."""
        return UFRewardConfig(recipe=task, data=self.data, model=self.model, dtype=self.dtype,
                              embed_max_length=self.embed_max_length, embed_batch_size=self.embed_batch_size,
                              episodes=self.episodes, eval=self.eval, pca_context_sizes=())

    def model_config(self, method: str):
        """The method's model config: this config's field of that name ("-" as "_"), or (a peer added to
        ``PEER_MODELS`` without a field here) its release defaults."""
        field = method.replace("-", "_")
        if hasattr(self, field):
            return getattr(self, field)
        return PEER_MODELS[method][0](kind=method)


def _method_runs(run, config: PeersConfig, task: str, method: str, model_config, pools, identity,
                 users) -> dict[str, Any]:
    """The tuned method on ``task``: every rate on the first seed, the best by validation NLL on the rest."""
    def fit_one(learning_rate: float, seed: int):
        train = dataclasses.replace(config.train, learning_rate=learning_rate, seed=seed)
        return run.fit_and_evaluate_reward_model(f"{task}/{method}/lr={learning_rate:g}/seed={seed}",
                                                 told_the_run(model_config, len(users), learning_rate), pools,
                                                 data_identity=identity, train=train, episodes=config.episodes,
                                                 user_names=users)

    first, *rest = config.seeds
    tuning = {rate: fit_one(rate, first) for rate in config.learning_rates}
    rate = min(tuning, key=lambda r: tuning[r][0].best_val_loss)
    seeds = {first: tuning[rate]} | {seed: fit_one(rate, seed) for seed in rest}
    model = seeds[first][0].model()
    adapt = adaptation_seconds_per_user(model, pools["test"], config.episodes, ADAPTATION_CONTEXT)
    entry = {
        "kind": model_config.kind,
        "model_config": config_to_dict(told_the_run(model_config, len(users), rate)),  # as the chosen rate trained it
        "unseen_accuracy": summarise_over_seeds([e["unseen_accuracy"] for _, e in seeds.values()]),
        "learning_rate": rate,
        "tuning_val_nll": {f"{r:g}": fit.best_val_loss for r, (fit, _) in tuning.items()},
        "train_seconds_per_seed": [e["wall_clock_seconds"] for _, e in seeds.values()],
        "parameters": parameter_count(model),
        "adapt_ms_per_user": 1000 * adapt,
        "adapt_gradient_steps": int(getattr(model, "adaptation_gradient_steps", 0)),
    }
    if task == "correlated":
        entry["z_inference_error"] = _z_inference_error([fit for fit, _ in seeds.values()], pools["test"],
                                                        config.episodes)
    if hasattr(model, "posterior"):  # VPL: SPL's active latent units of the posterior mean
        entry["active_latent_units"] = _active_units(model, pools["test"], config.episodes)
    return entry


def _z_inference_error(fits, pool, spec: EpisodeSpec) -> dict[str, Any]:
    """The error of inferring a test user's type from one context pair (the correlation study's measure,
    ``nps.train.evaluate.identification_errors``), mean ± s.e. over seeds, next to the Bayes error."""
    probe_a, probe_b = conflicting_probe_pairs(CORRELATED_RHO, 4096, seed=1)
    per_seed = [identification_errors(fit.model(), pool, probe_a, probe_b, spec, Z_ERROR_TASKS, Z_ERROR_PROBES,
                                      jax.random.key(7))[0].mean() for fit in fits]
    return mean_and_sem(per_seed) | {"bayes_optimal": bayes_error_single_pair(CORRELATED_RHO)}


def _active_units(model, pool, spec: EpisodeSpec) -> float:
    episodes = sample_episodes(jax.random.key(3), pool, spec.for_context(ADAPTATION_CONTEXT), 512, ADAPTATION_CONTEXT)
    return float(active_latent_units(model.context_latent(episodes)))


def _oracle_runs(run, config: PeersConfig, task: str, pools, identity, users, rate: float) -> dict[str, Any]:
    """One BTL per user type on its labels alone, each scored on its own type's users, per seed, at ``rate``."""
    per_seed, seconds = [], []
    for seed in config.seeds:
        train = dataclasses.replace(config.train, seed=seed, learning_rate=rate)
        by_type = {}
        for k, user in enumerate(users):
            _, by_type[user] = run.fit_and_evaluate_reward_model(
                f"{task}/{ORACLE}/lr={rate:g}/{user}/seed={seed}", config.btl, oracle_pools(pools, k),
                data_identity=identity | {"labels": user}, train=train, episodes=config.episodes, user_names=users)
        seconds.append(sum(entry["wall_clock_seconds"] for entry in by_type.values()))
        per_seed.append({size: {user: by_type[user]["unseen_accuracy"][size][user] for user in users}
                         | {"all": mean_and_sem([by_type[u]["unseen_accuracy"][size][u]["mean"] for u in users])}
                         for size in by_type[users[0]]["unseen_accuracy"]})
    return {"kind": "btl", "unseen_accuracy": summarise_over_seeds(per_seed), "learning_rate": rate,
            "train_seconds_per_seed": seconds, "adapt_gradient_steps": 0}


def format_peers_table(task: str, entries: dict[str, dict[str, Any]], sizes) -> str:
    """A markdown table: accuracy [%] over all users per N^C (mean ± s.e. over seeds), then the costs."""
    header = ["method", *(f"N^C={s}" for s in sizes), "lr", "train s/seed", "params", "adapt ms/user", "grad steps"]
    with_z_error = any("z_inference_error" in entry for entry in entries.values())
    if with_z_error:
        header.append("z error from 1 pair [%]")
    lines = [f"**{task}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in entries.items():
        accuracy = [f"{100 * entry['unseen_accuracy'][str(s)]['all']['mean']:.1f} ± "
                    f"{100 * entry['unseen_accuracy'][str(s)]['all']['sem']:.1f}" for s in sizes]
        seconds = entry["train_seconds_per_seed"]
        costs = [f"{entry['learning_rate']:g}" if "learning_rate" in entry else "",
                 f"{sum(seconds) / len(seconds):.0f}",
                 f"{entry['parameters']:,}" if "parameters" in entry else "",
                 f"{entry['adapt_ms_per_user']:.3f}" if "adapt_ms_per_user" in entry else "",
                 str(entry["adapt_gradient_steps"])]
        if with_z_error:
            error = entry.get("z_inference_error")
            costs.append(f"{100 * error['mean']:.1f} ± {100 * error['sem']:.1f} "
                         f"(Bayes {100 * error['bayes_optimal']:.1f})" if error else "")
        lines.append("| " + " | ".join([name, *accuracy, *costs]) + " |")
    return "\n".join(lines)


def task_data(config: PeersConfig, task: str, run) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``task``'s pools by split, its data's identity and its user types' names. An UltraFeedback task's
    data is prepared and embedded under ``<out>/<task>`` (cached there for a resumed run); the steering
    task reads ``steering_run`` or trains the default steering run under ``<out>/steering`` once."""
    out, echo = run.out, run.echo
    if task == STEERING_TASK:
        steering = trained_run(config.steering_run, out, run.progress, echo)
        return steering.feature_pools(), steering.data.identity, list(steering.user_types)
    if task in UF_TASKS:
        inputs = prepare_inputs(config.uf_inputs(task), out / task, echo)
        return uf_pools(inputs.data, inputs.features), inputs.identity, list(inputs.data.attributes)
    make_pools, make_identity, users = TASKS[task]
    return make_pools(config.num_pairs, config.data_seed), make_identity(config.num_pairs, config.data_seed), users


def run_peers(config: PeersConfig, out: str | Path, *, fresh: bool = False, progress: bool = True,
              echo=print) -> dict[str, Any]:
    """Every method on every task; results.json (models named ``task/method``), a markdown table
    (peers.md) and one accuracy-vs-N^C plot per task under ``out``."""
    with experiment_run("peers", config, out, fresh=fresh, progress=progress, echo=echo) as run:
        models, tables, plots, data = {}, [], [], {}
        for task in config.tasks:
            pools, identity, users = task_data(config, task, run)
            data[task] = identity
            entries = {method: _method_runs(run, config, task, method, config.model_config(method), pools, identity,
                                            users)
                       for method in config.methods}
            if config.oracle:  # at the rate the grid picked for the population BTL
                rate = entries["btl"]["learning_rate"] if "btl" in entries else config.learning_rates[0]
                entries[ORACLE] = _oracle_runs(run, config, task, pools, identity, users, rate)
            models |= {f"{task}/{name}": entry for name, entry in entries.items()}
            tables.append(format_peers_table(task, entries, config.eval.context_sizes))
            plots.append(plot_accuracy_vs_context(entries, [*users, "all"], run.out / f"{task}.png",
                                                  f"{task}: unseen accuracy, mean ± s.e. over seeds"))
        atomic_write_text(run.out / "peers.md", "\n\n".join(tables) + "\n")
        return run.finish(tables=tables, plots=plots, data=data, models=models,
                          tuning={"learning_rates": list(config.learning_rates), "selected_by": "validation NLL",
                                  "seed": config.seeds[0]})
