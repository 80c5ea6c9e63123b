"""Training: configs, the Trainer (a thin loop over a run context), evaluation as a free
function, typed checkpoint state, metrics writers, and a compact tensor loop."""

from .build import RunExistsError, TrainingDiverged, build_model, build_optimizer, cosine_lr, seed_everything
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from .config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from .context import RunContext, resolve_device
from .evaluation import evaluate as evaluate_objective
from .lock import RunLockedError
from .loop import Trainer
from .persist import load_trained_model, save_model
from .simple import evaluate, train_classifier
from .state import CheckpointState

__all__ = [
    "Trainer",
    "RunContext",
    "resolve_device",
    "CheckpointState",
    "evaluate_objective",
    "TrainingDiverged",
    "RunExistsError",
    "RunLockedError",
    "load_trained_model",
    "save_model",
    "ExperimentConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "build_model",
    "build_optimizer",
    "cosine_lr",
    "seed_everything",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "CheckpointError",
    "train_classifier",
    "evaluate",
]
