"""Training engine: configs, the Trainer, checkpoints, and a compact tensor loop."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from .engine import Trainer, build_model, build_optimizer, cosine_lr, seed_everything
from .simple import evaluate, train_classifier

__all__ = [
    "Trainer",
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
    "train_classifier",
    "evaluate",
]
