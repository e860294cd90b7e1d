"""Training: ``fit`` (Optax, scanned jit steps, validation, Orbax checkpoints), evaluation, meshes."""

from nps.train.evaluate import evaluate_unseen_accuracy
from nps.train.loop import FitResult, TrainConfig, fit, load_trained
from nps.train.run import EvalConfig, fit_and_evaluate, train_and_evaluate

__all__ = [
    "EvalConfig",
    "FitResult",
    "TrainConfig",
    "evaluate_unseen_accuracy",
    "fit",
    "fit_and_evaluate",
    "load_trained",
    "train_and_evaluate",
]
