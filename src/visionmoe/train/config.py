"""Experiment configs: YAML (``yaml.safe_load``) validated into dataclasses.

Unknown keys and wrong types are rejected with the key path and a close-match
suggestion; ``key.sub=value`` overrides (values parsed as YAML) apply on top.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .._utils import did_you_mean
from .._utils import short_repr as _short
from ..moe.config import MoEConfig

__all__ = [
    "ConfigError",
    "dataclass_from_dict",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "RunConfig",
    "ExperimentConfig",
    "load_config",
    "load_yaml_dict",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key path."""


@dataclass
class ModelConfig:
    """``name``: a registered variant (``visionmoe list-models``); ``args``: overrides passed to
    ``create_model`` (``num_classes`` and ``in_chans`` default to the data set's);
    ``dense``: drop the variant's MoE layers; ``init``: start from a dense checkpoint (a
    visionmoe run checkpoint, or a timm / MAE / MoCo v3 / DINOv2 state dict in safetensors or a
    plain torch file) whose MLPs are upcycled into the experts (ViMoE), with relative noise
    ``init_noise``; ``init_skip``: key prefixes not loaded (default the classifier head);
    ``init_shared``: with a shared expert, ``copy`` (every expert a copy of the dense MLP) or
    ``zero_routed`` (the routed experts' output layer zero: the MoE starts exactly as the
    dense model)."""

    name: str = "vit_tiny_patch4_32"
    args: dict[str, Any] = field(default_factory=dict)
    dense: bool = False
    init: str | None = None
    init_noise: float = 0.0
    init_skip: list[str] = field(default_factory=lambda: ["head."])
    init_shared: str = "copy"

    def __post_init__(self) -> None:
        if self.init_shared not in ("copy", "zero_routed"):
            raise ValueError(f"model.init_shared must be 'copy' or 'zero_routed', got {self.init_shared!r}")


@dataclass
class DataConfig:
    """``name``: a data set (``visionmoe list-data``); ``args``: loader arguments (``root``,
    ``limit``...); images are adapted to ``img_size`` / ``channels`` (default: the model's).

    The evaluation preprocessing (stored in every checkpoint and used by ``eval``, ``predict``,
    ``export``): ``resize`` ``squash`` (the whole image to ``img_size``) or ``crop`` (shorter side
    to ``img_size / crop_pct``, centre crop: timm's eval transform); ``normalize`` ``none``
    (inputs in [0, 1]), ``imagenet``, ``inception`` or ``model`` (the model's ``pretrained_cfg``).
    Training: ``augment`` (``rrc`` on a folder is timm's ``create_transform`` with
    ``auto_augment``, e.g. ``rand-m9-mstd0.5-inc1``, and random erasing ``reprob``); ``workers``
    loader processes (default: 0 for in-memory sets, up to 4 for folders)."""

    name: str = "fashion_mnist"
    args: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    channels: int | None = None
    augment: Literal["none", "basic", "flip", "shift", "rrc"] = "basic"
    auto_augment: str | None = None
    reprob: float = 0.0
    resize: Literal["squash", "crop"] = "squash"
    crop_pct: float = 0.875
    normalize: Literal["none", "imagenet", "inception", "model"] = "none"
    batch_size: int = 128
    eval_batch_size: int = 512
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"data.batch_size and data.eval_batch_size must be >= 1, got {self.batch_size} and "
                             f"{self.eval_batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"data.img_size must be >= 1, got {self.img_size}")


@dataclass
class OptimConfig:
    """``name``: any timm optimizer (``adamw``, ``sgd``, ``lamb``...). ``fused``: use
    PyTorch's single-kernel implementation for ``adam`` / ``adamw`` (on the CPU ~3x
    faster than the per-tensor loop, ~5x on a ViT-S MoE with its 72M parameters; same
    update up to float rounding); ignored by other optimizers."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: float | None = None
    router_lr_scale: float = 1.0
    clip_grad: float | None = 1.0
    fused: bool = True

    def __post_init__(self) -> None:
        _at_least(self, "optim", lr=0.0, weight_decay=0.0)
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"optim.clip_grad must be > 0 or null (no clipping), got {self.clip_grad}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        if self.router_lr_scale < 0:
            raise ValueError(f"optim.router_lr_scale must be >= 0, got {self.router_lr_scale}")


@dataclass
class ScheduleConfig:
    """Linear warm-up then cosine decay to ``min_lr``, stepped every update."""

    epochs: float = 10.0
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"schedule.epochs must be > 0, got {self.epochs}")
        _at_least(self, "schedule", warmup_epochs=0.0, min_lr=0.0)
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"schedule.max_steps must be >= 1 or null (use epochs), got {self.max_steps}")


@dataclass
class RunConfig:
    """Run-level settings: seeds, numerics, logging and checkpoints."""

    seed: int = 0
    deterministic: bool = False
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float | None = None
    device: str = "auto"  # auto (CUDA if available, else CPU) | cpu | cuda | cuda:N | mps
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16: CUDA only, with a GradScaler
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA
    compile: bool = False
    log_every: int = 50
    eval_every_epochs: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    out_dir: str = "runs"
    name: str | None = None
    tensorboard: bool = False
    progress: bool = True
    print_eval: bool = True  # a line per evaluation (recipes running many short stages switch it off)
    # torch's intra-op threads: auto (the cores other processes leave free, re-checked during
    # training: on a shared machine torch's default can be ~10x slower), N, or null (torch's default)
    threads: int | Literal["auto"] | None = "auto"
    # reliability: a step whose loss or gradient is NaN/Inf is skipped; more than this many
    # skipped steps stop the run with an error
    max_skipped_steps: int = 10
    # router-collapse warning: one expert takes more than this share of a layer's assignments
    # for collapse_steps steps in a row (None: off), or an expert gets nothing for dead_expert_steps (0: off)
    collapse_share: float | None = 0.9
    collapse_steps: int = 50
    dead_expert_steps: int = 200

    def __post_init__(self) -> None:
        for name in ("out_dir", "name"):
            value = getattr(self, name)
            if value is not None and ".." in Path(value).parts:
                raise ValueError(f"run.{name}={value!r} may not contain '..': run folders stay inside out_dir")
        if self.name is not None and (Path(self.name).is_absolute() or not self.name.strip()):
            raise ValueError(f"run.name={self.name!r} must be a relative folder name (it is placed under run.out_dir)")
        if self.keep_checkpoints < 0:
            raise ValueError(f"run.keep_checkpoints must be >= 0 (0: write none), got {self.keep_checkpoints}")
        _at_least(self, "run", log_every=1, checkpoint_every=1, collapse_steps=1, dead_expert_steps=0)  # 0: off
        if self.eval_every_epochs <= 0:
            raise ValueError(f"run.eval_every_epochs must be > 0 (e.g. 1e9 for only the final evaluation), got "
                             f"{self.eval_every_epochs}")
        if isinstance(self.threads, int) and self.threads < 1:
            raise ValueError(f"run.threads must be auto, >= 1 or null (torch's default), got {self.threads}")
        if not 0 <= self.label_smoothing < 1 or self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"run.label_smoothing must be in [0, 1) and run.mixup / run.cutmix >= 0, got "
                             f"{self.label_smoothing} / {self.mixup} / {self.cutmix}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"run.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.max_skipped_steps < 0:
            raise ValueError(f"run.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        if self.collapse_share is not None and not 0 < self.collapse_share <= 1:
            raise ValueError(f"run.collapse_share must be in (0, 1] or null, got {self.collapse_share}")


@dataclass
class ExperimentConfig:
    """A whole experiment. ``moe`` holds :class:`~visionmoe.moe.MoEConfig` fields merged onto
    the model variant's MoE settings (``moe.num_experts=16`` on the command line);
    ``objective`` is ``classification``, ``mae`` (``objective_args``: ``mask_ratio``,
    ``norm_pix_loss``, ``decoder_dim``, ``decoder_depth``, ``decoder_heads``) or ``moco``
    (MoCo v3 with optional CR-MoE OGAR; ``objective_args``: the keywords of
    :class:`~visionmoe.objectives.MoCoObjective`, e.g. ``ogar_weight``, ``alpha``, ``dim``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    objective: str = "classification"  # a registered objective (visionmoe.objectives.OBJECTIVES)
    objective_args: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.objective == "segmentation" and self.data.augment != "none":
            raise ConfigError(f"data.augment={self.data.augment!r} would move the images but not their masks; use "
                              "data.augment=none for segmentation")
        moe_fields = {f.name for f in dataclasses.fields(MoEConfig)}
        for key in self.moe:
            if key not in moe_fields:
                raise ConfigError(_unknown_msg(f"moe.{key}", key, moe_fields))


def _at_least(section: Any, name: str, **bounds: float) -> None:
    """Refuse ``section.<field> < bound`` for each ``field=bound``, naming the key."""
    for field_, low in bounds.items():
        value = getattr(section, field_)
        if value < low:
            raise ValueError(f"{name}.{field_} must be >= {low:g}, got {value}")


def _unknown_msg(path: str, key: str, choices) -> str:
    return f"unknown config key {path!r}.{did_you_mean(key, choices)} Valid keys here: {', '.join(sorted(choices))}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, option, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_short(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: must be one of {list(typing.get_args(tp))}, got {_short(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_short(value)}")
        return _from_dict(tp, value, path + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_short(value)}")
        _, item = typing.get_args(tp) or (Any, Any)
        return {k: _check(v, item, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_short(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 5e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {_short(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_short(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_short(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_short(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_short(value)}")
        return value
    return value


def dataclass_from_dict(cls, d: dict, prefix: str = ""):
    """An instance of the dataclass ``cls`` from a mapping, every key and value checked as a
    config section is (unknown keys with a suggestion, types converted, nested dataclasses);
    recipes build their study configs with it."""
    return _from_dict(cls, d, prefix)


def _from_dict(cls, d: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in names:
            raise ConfigError(_unknown_msg(prefix + str(key), str(key), names))
    kwargs = {k: _check(v, hints[k], prefix + k) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def _check_objective_args(objective: str, args: dict) -> None:
    """Unknown objectives and ``objective_args`` keys are refused here, with a suggestion, not
    deep in a run."""
    from ..objectives import objective_arguments

    try:
        valid = objective_arguments(objective)
    except ValueError as e:
        raise ConfigError(f"objective: {e}") from None
    for key in args:
        if key not in valid:
            raise ConfigError(_unknown_msg(f"objective_args.{key}", key, valid))


def config_from_dict(d: dict | None) -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig`."""
    cfg = _from_dict(ExperimentConfig, d or {})
    _check_objective_args(cfg.objective, cfg.objective_args)
    if cfg.moe:  # validate MoE fields and values early, with their own clear errors
        hints = typing.get_type_hints(MoEConfig)  # types as for every other section (YAML 1.1 reads 1e-1 as text)
        cfg.moe = {k: _check(v, hints[k], f"moe.{k}") for k, v in cfg.moe.items()}
        try:
            MoEConfig.from_dict({**MoEConfig().to_dict(), **cfg.moe})
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


#: more values than this (aliases expanded) in one YAML document is refused: a config is small,
#: and an alias bomb must not exhaust memory when it is copied or printed
MAX_YAML_VALUES = 100_000


def _bounded(value: Any, where: str) -> Any:
    """``value`` if it holds at most :data:`MAX_YAML_VALUES` values once aliases are expanded."""
    count, stack = 0, [value]
    while stack:
        v = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: more than {MAX_YAML_VALUES:,} values (YAML aliases expanded); a config "
                              "needs far fewer — remove the repeated aliases")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return value


def parse_yaml_value(raw: str, where: str) -> Any:
    """One ``key=value`` value, parsed with ``yaml.safe_load`` (``None`` when empty); invalid
    YAML (an unclosed bracket, a tag) is refused in one line naming the entry."""
    if not raw.strip():
        return None
    try:
        return _bounded(yaml.safe_load(raw), where)
    except yaml.YAMLError as e:
        reason = str(getattr(e, "problem", None) or e).splitlines()[0]
        raise ConfigError(f"{where}: {_short(raw)} is not a valid value ({reason}); close brackets and quotes, "
                          "e.g. key=[1, 2] or key='text'") from None


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed with ``yaml.safe_load``) to a dict."""
    d = yaml.safe_load(yaml.safe_dump(_bounded(d, "config"))) or {}  # deep copy with plain types
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {_short(item)} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = parse_yaml_value(raw, f"override {key.strip()}")
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return d


def load_yaml_dict(path: str | Path | None) -> dict:
    """The top-level mapping of a YAML file read with the safe loader (``{}`` for no path);
    a missing file, invalid YAML or a non-mapping top level is refused with a clear error."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML (only plain YAML is accepted): {e}") from e
    _bounded(d, str(path))
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return d


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (safe loader only), apply overrides, validate."""
    return config_from_dict(apply_overrides(load_yaml_dict(path), list(overrides or [])))
