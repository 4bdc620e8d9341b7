"""Annealing schedules of the mask learners: a value moving from start to end as training progresses."""

from __future__ import annotations

import math

KINDS = ("linear", "exp", "cosine", "constant")


def anneal(start: float, end: float, progress: float, kind: str = "linear") -> float:
    """The value at `progress` in [0, 1] (clamped) of a schedule from start to end.

    linear: straight line; exp: geometric (constant ratio per step, for positive start and end);
    cosine: half cosine; constant: start throughout."""
    if kind not in KINDS:
        raise ValueError(f"schedule kind must be one of {KINDS}, got {kind!r}")
    t = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return start
    if kind == "linear":
        return start + (end - start) * t
    if kind == "exp":
        if start <= 0 or end <= 0:
            raise ValueError(f"an exp schedule needs positive start and end, got {start} and {end}")
        return start * (end / start) ** t
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
