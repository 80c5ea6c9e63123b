"""Watchdogs the trainer runs every step: router collapse and dead experts."""

from __future__ import annotations

from torch import nn

from ..moe.layer import moe_layers

__all__ = ["RoutingMonitor"]


class RoutingMonitor:
    """Warn when routing collapses.

    Two signs, checked on the assignments of every training step of every MoE layer:
    one expert takes more than ``share`` of the layer's assignments for ``steps`` steps
    in a row, or an expert receives no assignment at all for ``dead_steps`` steps in a
    row. Each sign is reported once per layer (with the statistics), not every step.

    Args:
        share: collapse threshold in (0, 1]; None turns the collapse check off.
        steps: consecutive steps above ``share`` before warning.
        dead_steps: consecutive steps without tokens before an expert counts as dead
            (0 turns the check off).
    """

    def __init__(self, share: float | None = 0.9, steps: int = 50, dead_steps: int = 200) -> None:
        self.share, self.steps, self.dead_steps = share, max(1, steps), dead_steps
        self._streak: dict[str, int] = {}
        self._idle: dict[str, list[int]] = {}
        self._warned: set[tuple[str, str]] = set()

    def update(self, model: nn.Module, step: int) -> list[str]:
        """Look at the last forward of every MoE layer; returns the new warnings."""
        out = []
        for name, layer in moe_layers(model):
            if layer.last is None:
                continue
            counts = layer.last.expert_counts.float()
            total = float(counts.sum())
            if total <= 0:
                continue
            load = counts / total
            top = float(load.max())
            if self.share is not None:
                streak = self._streak.get(name, 0) + 1 if top > self.share else 0
                self._streak[name] = streak
                if streak >= self.steps and (name, "collapse") not in self._warned:
                    self._warned.add((name, "collapse"))
                    out.append(
                        f"router collapse in {name} at step {step}: expert {int(load.argmax())} has taken "
                        f"{top:.0%} or more of the assignments for {streak} steps (threshold {self.share:.0%}); "
                        f"load {[round(v, 3) for v in load.tolist()]}. Consider a larger auxiliary loss weight, "
                        "router noise, or a lower router learning rate")
            if self.dead_steps:
                idle = self._idle.get(name) or [0] * len(counts)
                idle = [i + 1 if c == 0 else 0 for i, c in zip(idle, counts.tolist())]
                self._idle[name] = idle
                dead = [e for e, i in enumerate(idle) if i >= self.dead_steps]
                if dead and (name, "dead") not in self._warned:
                    self._warned.add((name, "dead"))
                    out.append(
                        f"dead experts in {name} at step {step}: expert(s) {dead} of {len(idle)} received no "
                        f"tokens for {self.dead_steps} steps; load {[round(v, 3) for v in load.tolist()]}")
        return out
