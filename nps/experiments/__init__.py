"""The paper's experiments, one module each: a config, a composition of library calls, and plots.

``EXPERIMENTS`` is the one table of what ``nps reproduce`` runs: name -> (module, config
factory, run function). Modules are imported when an experiment is asked for, so that
``nps --help`` answers without loading JAX. Nothing outside this package and ``nps.cli``
imports from it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple


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
    "consistency": Experiment("consistency", "ConsistencyConfig", "run_consistency",
                              "drift and mistaken answers found in simulated users' profiles"),
}
