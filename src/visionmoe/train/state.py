"""The typed state a run checkpoint carries beside its tensors.

:func:`~visionmoe.train.checkpoint.save_checkpoint` stores ``CheckpointState.to_dict()`` as
JSON in the safetensors metadata; :meth:`CheckpointState.from_dict` reads it back, including
files written before a field existed (their preprocessing is what those versions did: the
image squashed to ``img_size``, no normalisation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..data.preprocess import Preprocessing

__all__ = ["CheckpointState", "model_spec", "build_from_spec"]


@dataclass
class CheckpointState:
    """Step counters, the experiment config, what the model predicts and how its inputs are made."""

    step: int
    config: dict[str, Any]
    num_classes: int
    in_chans: int
    img_size: int
    classes: list[str] = field(default_factory=list)
    skipped_steps: int = 0
    preprocessing: dict[str, Any] | None = None
    model_spec: dict[str, Any] | None = None  # how to rebuild a model passed in by hand (see model_spec())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointState:
        missing = [k for k in ("step", "config", "num_classes", "in_chans", "img_size") if k not in d]
        if missing:
            raise ValueError(f"checkpoint state lacks {missing}: not a visionmoe training checkpoint")
        return cls(step=int(d["step"]), config=d["config"], num_classes=int(d["num_classes"]),
                   in_chans=int(d["in_chans"]), img_size=int(d["img_size"]), classes=list(d.get("classes") or []),
                   skipped_steps=int(d.get("skipped_steps", 0)), preprocessing=d.get("preprocessing"),
                   model_spec=d.get("model_spec"))

    @property
    def preprocess(self) -> Preprocessing:
        """The evaluation preprocessing the model was trained with."""
        if self.preprocessing:
            return Preprocessing.from_dict(self.preprocessing)
        return Preprocessing(size=self.img_size, channels=self.in_chans)


def _json_plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_json_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _json_plain(x) for k, x in v.items())
    return False


def model_spec(model: Any) -> dict[str, Any] | None:
    """How to rebuild ``model`` exactly (a visionmoe ``VisionTransformer``: its constructor
    arguments, its current head and pooling, its MoE settings), or ``None`` when it cannot be
    written as plain JSON (then the experiment config describes the model)."""
    from ..models import VisionTransformer

    if type(model) is not VisionTransformer:
        return None
    moe = model.moe_config.to_dict() if model.moe_config is not None else None
    # the constructor's arguments, then the head as it is now (reset_classifier after building
    # keeps the built norm layers, so the pooling is re-set rather than passed to the constructor)
    spec = {"class": "VisionTransformer", "kwargs": dict(model.init_kwargs), "moe": moe,
            "head": {"num_classes": int(model.num_classes), "global_pool": model.global_pool}}
    return spec if _json_plain(spec) else None


def build_from_spec(spec: dict[str, Any]) -> Any:
    from ..models import VisionTransformer

    if spec.get("class") != "VisionTransformer":
        raise ValueError(f"checkpoint model_spec names an unknown class {spec.get('class')!r}")
    model = VisionTransformer(moe=spec.get("moe"), **spec["kwargs"])
    head = spec.get("head")
    if head and (head["num_classes"] != model.num_classes or head["global_pool"] != model.global_pool):
        model.reset_classifier(head["num_classes"], global_pool=head["global_pool"])
    return model
