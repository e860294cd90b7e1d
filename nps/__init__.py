"""nps: few-shot steerable alignment with neural processes, in JAX/Flax.

The core (this package's top level): ``nps.likelihood`` (BTL, DPL, posterior predictive) and
``nps.latent`` (diagonal Gaussian q(z|·), KL), pure functions over pytrees, and ``nps.encoder``
(context pairs -> z, an NNX module). Models live in
``nps.models``, training in ``nps.train``, data in ``nps.data``, and the paper's
experiments in ``nps.experiments``.

Names are imported when first used (PEP 562), so importing a light part of nps (the `nps` command
installs its Ctrl-C handling first, ``nps.interrupts``) does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ContextEncoder": "nps.encoder", "EncoderConfig": "nps.encoder",
    "DiagonalGaussian": "nps.latent", "gaussian_kl": "nps.latent",
    **dict.fromkeys(["btl_log_odds", "btl_log_prob", "choice_accuracy", "choice_nll", "dpl_log_odds", "dpl_log_prob",
                     "posterior_predictive_log_odds"], "nps.likelihood"),
}

__version__ = "0.1.0"

__all__ = [
    "ContextEncoder",
    "DiagonalGaussian",
    "EncoderConfig",
    "btl_log_odds",
    "btl_log_prob",
    "choice_accuracy",
    "choice_nll",
    "dpl_log_odds",
    "dpl_log_prob",
    "gaussian_kl",
    "posterior_predictive_log_odds",
]


def __getattr__(name: str) -> Any:
    """A public name (imported from its home on first use), or a submodule (``nps.likelihood``)."""
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
