"""Training: ``fit`` (Optax, scanned jit steps, hooks, validation, Orbax checkpoints), evaluation, meshes."""

from nps.train.evaluate import EvalConfig, evaluate_unseen_accuracy
from nps.train.loop import FitResult, TrainConfig, fit, load_trained

__all__ = [
    "EvalConfig",
    "FitResult",
    "TrainConfig",
    "evaluate_unseen_accuracy",
    "fit",
    "load_trained",
]
