"""Placement policies: which blocks of a backbone hold experts, as data.

A policy is a name (``"every_2"``, ``"last_2"``, ``"all"``, ``"none"``), an explicit list
of block indices (``[10, 11]`` or the string ``"layers=[10, 11]"``), or a policy that
needs extra information (``"by_gradient_magnitude"`` / ``"by_gradient_magnitude_{n}"`` take
per-block scores; the Trainer computes them on the first batches when a config asks for it).
``resolve_placement(policy, depth)`` turns any of them into a sorted list of indices.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .._utils import did_you_mean

__all__ = ["resolve_placement", "list_placements", "every_n", "last_n", "first_n", "by_scores", "probed_layers",
           "PLACEMENTS"]


def every_n(depth: int, n: int) -> list[int]:
    """V-MoE "Every n": blocks ``n-1, 2n-1, ...`` (0-based), the last block of each group."""
    if n < 1:
        raise ValueError(f"every_n needs n >= 1, got {n}")
    return list(range(n - 1, depth, n))


def last_n(depth: int, n: int) -> list[int]:
    """The last ``n`` blocks."""
    if not 0 <= n <= depth:
        raise ValueError(f"last_n needs 0 <= n <= depth={depth}, got {n}")
    return list(range(depth - n, depth))


def first_n(depth: int, n: int) -> list[int]:
    """The first ``n`` blocks."""
    if not 0 <= n <= depth:
        raise ValueError(f"first_n needs 0 <= n <= depth={depth}, got {n}")
    return list(range(n))


def by_scores(scores: Sequence[float], n: int) -> list[int]:
    """The ``n`` blocks with the largest scores (e.g. MLP gradient norms, MoCE's rule)."""
    if not 0 <= n <= len(scores):
        raise ValueError(f"cannot pick {n} blocks out of {len(scores)} scores")
    ranked = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(ranked[:n])


_PATTERNS: dict[str, tuple[str, Callable[[int, int], list[int]]]] = {
    "every_{n}": (r"every_(\d+)", every_n),
    "last_{n}": (r"last_(\d+)", last_n),
    "first_{n}": (r"first_(\d+)", lambda depth, n: first_n(depth, n)),
}
PLACEMENTS = ["all", "none", *_PATTERNS, "layers=[i, j, ...]", "by_gradient_magnitude", "by_gradient_magnitude_{n}"]


def probed_layers(policy) -> int | None:
    """For ``"by_gradient_magnitude"`` (0: the caller's default count) or
    ``"by_gradient_magnitude_{n}"``: the number of blocks to pick; None for any other policy."""
    if not isinstance(policy, str):
        return None
    m = re.fullmatch(r"by_gradient_magnitude(?:_(\d+))?", policy.strip())
    return None if m is None else int(m.group(1) or 0)


def list_placements() -> list[str]:
    """Names of the placement policies."""
    return list(PLACEMENTS)


def resolve_placement(
    policy: str | Sequence[int] | None,
    depth: int,
    *,
    scores: Sequence[float] | None = None,
    num_layers: int = 2,
) -> list[int]:
    """Resolve a placement policy to sorted block indices in ``[0, depth)``.

    Args:
        policy: see the module docstring.
        depth: number of blocks in the backbone.
        scores: per-block scores for ``"by_gradient_magnitude"``.
        num_layers: how many blocks ``"by_gradient_magnitude"`` picks.
    """
    if policy is None or policy == "none":
        return []
    if isinstance(policy, str):
        name = policy.strip()
        if name == "all":
            return list(range(depth))
        probe = probed_layers(name)
        if probe is not None:
            num_layers = probe or num_layers
            if scores is None:
                raise ValueError(
                    "placement 'by_gradient_magnitude' needs per-block scores; compute them with "
                    "visionmoe.analysis.gradient_magnitude_scores(model, batch, loss_fn)"
                )
            if len(scores) != depth:
                raise ValueError(f"got {len(scores)} scores for {depth} blocks")
            return by_scores(scores, num_layers)
        m = re.fullmatch(r"layers\s*=\s*\[([\d,\s]*)\]", name)
        if m:
            return resolve_placement([int(v) for v in m.group(1).split(",") if v.strip()], depth)
        for regex, fn in _PATTERNS.values():
            m = re.fullmatch(regex, name)
            if m:
                return fn(depth, int(m.group(1)))
        hint = did_you_mean(name, ["all", "none", "every_2", "last_2", "by_gradient_magnitude"])
        raise ValueError(f"unknown placement {policy!r}.{hint} Known policies: {PLACEMENTS}")
    indices = sorted({int(i) for i in policy})
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f"placement indices {bad} out of range for a backbone of depth {depth}")
    return indices
