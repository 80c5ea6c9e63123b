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

__all__ = ["CheckpointState"]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointState:
        missing = [k for k in ("step", "config", "num_classes", "in_chans", "img_size") if k not in d]
        if missing:
            raise ValueError(f"checkpoint state lacks {missing}: not a visionmoe training checkpoint")
        return cls(step=int(d["step"]), config=d["config"], num_classes=int(d["num_classes"]),
                   in_chans=int(d["in_chans"]), img_size=int(d["img_size"]), classes=list(d.get("classes") or []),
                   skipped_steps=int(d.get("skipped_steps", 0)), preprocessing=d.get("preprocessing"))

    @property
    def preprocess(self) -> Preprocessing:
        """The evaluation preprocessing the model was trained with."""
        if self.preprocessing:
            return Preprocessing.from_dict(self.preprocessing)
        return Preprocessing(size=self.img_size, channels=self.in_chans)
