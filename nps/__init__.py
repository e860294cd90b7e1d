"""nps: few-shot steerable alignment with neural processes, in JAX/Flax.

The core (this package's top level) is pure functions over pytrees:
``nps.likelihood`` (BTL, DPL, posterior predictive), ``nps.latent`` (diagonal
Gaussian q(z|·), KL), ``nps.encoder`` (context pairs -> z). Models live in
``nps.models``, training in ``nps.train``, data in ``nps.data``, and the paper's
experiments in ``nps.experiments``.
"""

from nps.encoder import ContextEncoder, EncoderConfig
from nps.latent import DiagonalGaussian, gaussian_kl
from nps.likelihood import (
    btl_log_odds,
    btl_log_prob,
    choice_accuracy,
    choice_nll,
    dpl_log_odds,
    dpl_log_prob,
    posterior_predictive_log_odds,
)

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
