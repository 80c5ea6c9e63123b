"""Training engine: configs, the Trainer, checkpoints, and a compact tensor loop."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from .config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from .engine import (
    Trainer,
    TrainingDiverged,
    build_model,
    build_optimizer,
    cosine_lr,
    load_trained_model,
    seed_everything,
)
from .simple import evaluate, train_classifier

__all__ = [
    "Trainer",
    "TrainingDiverged",
    "load_trained_model",
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
