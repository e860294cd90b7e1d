"""The paper's experiments, one module each: a config, a composition of library calls, and plots.

``EXPERIMENTS`` is the one table of what ``nps reproduce`` runs: name -> (module, config
factory, run function), and ``reproduce`` runs one as the command does (a multi-process run
joined first, the config's overrides applied). Modules are imported when an experiment is asked
for, so that importing this table loads no JAX. Nothing outside this package and ``nps.cli``
imports from it.
"""

from __future__ import annotations

import importlib
import json
import warnings
from typing import Any, Callable, NamedTuple, Sequence


class Experiment(NamedTuple):
    module: str
    config: str  # the config class, or a factory of its defaults
    run: str
    summary: str

    def load(self) -> tuple[Callable[[], Any], Callable[..., dict[str, Any]]]:
        """(config factory, run function)."""
        module = importlib.import_module(f"nps.experiments.{self.module}")
        return getattr(module, self.config), getattr(module, self.run)


EXPERIMENTS = {
    "synthetic": Experiment("synthetic", "SyntheticConfig", "run_synthetic", "two users, BTL/DPL/NP-BTL (§5.1)"),
    "correlation": Experiment("correlation", "CorrelationConfig", "run_correlation",
                              "identifiability vs correlated options (§5.2)"),
    "steering": Experiment("steering", "SteeringConfig", "run_steering", "NP-DPO steers a small LM (CPU)"),
    "hh-dpo": Experiment("hh_dpo", "HHDPOConfig", "run_hh_dpo", "NP-DPO on UltraFeedback HH (GPU-sized)"),
    "hh": Experiment("ultrafeedback", "UFRewardConfig", "run_uf_rewards", "reward models on UltraFeedback HH"),
    "hht": Experiment("ultrafeedback", "hht_defaults", "run_uf_rewards", "reward models on UltraFeedback HHT"),
    "conflict": Experiment("ultrafeedback", "ConflictConfig", "run_conflict", "the conflict-rate study (Fig. 5)"),
    "continuum": Experiment("ultrafeedback", "ContinuumConfig", "run_continuum", "continuum users (Fig. 8)"),
    "active": Experiment("active", "ActiveConfig", "run_active", "active vs random questions"),
    "peers": Experiment("peers", "PeersConfig", "run_peers", "NP-BTL next to VPL, GPO and the other peers"),
    "consistency": Experiment("consistency", "ConsistencyConfig", "run_consistency",
                              "drift and mistaken answers found in simulated users' profiles"),
}


def default_out(experiment: str) -> str:
    """Where ``nps reproduce EXPERIMENT`` writes when no --out is given."""
    return f"runs/{experiment}"


def reproduce(experiment: str, *, out: str | None = None, overrides: Sequence[str] = (), model: str | None = None,
              data: str | None = None, fresh: bool = False, quiet: bool = False, print_config: bool = False,
              coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
              join_timeout: int = 120, peer_timeout: float = 20.0) -> int:
    """`nps reproduce`, with the command's flags: join the run's other processes (if it has any), build
    the experiment's config from its defaults, ``model``/``data`` and ``overrides`` ("field=value"), then
    print that config as JSON (``print_config``) or run the experiment into ``out`` (process 0 speaks)."""
    from nps.config import apply_overrides, config_to_dict
    from nps.train.distributed import JoinSettings, agree_with_primary, is_primary, join_run, run_identity

    joined = join_run(JoinSettings(coordinator, num_processes, process_id, join_timeout, peer_timeout))
    if joined and not is_primary():
        warnings.simplefilter("ignore")  # process 0 says everything once
    defaults, run = EXPERIMENTS[experiment].load()
    paths = [f"{name}={value}" for name, value in (("model", model), ("data", data)) if value]
    config = apply_overrides(defaults(), paths + list(overrides))
    if print_config:
        print(json.dumps(config_to_dict(config), indent=2))
        return 0
    out = out or default_out(experiment)
    if joined:  # before anything is trained or written: every process must run the same experiment
        agree_with_primary(run_identity({"experiment": experiment, "out": out, "fresh": fresh},
                                        config_to_dict(config)), "configuration", join_timeout)
    run(config, out, fresh=fresh, progress=not quiet, echo=print if is_primary() else lambda *_: None)
    return 0
