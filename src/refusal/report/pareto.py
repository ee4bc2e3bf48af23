"""The Pareto front of a sweep: the runs no other run of the same model beats on both harmful refusal and
next-token KL (both minimised)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from refusal.metrics.names import HARMFUL_REFUSAL, HARMLESS_KL

#: The two coordinates of the front, both minimised.
FRONT = (HARMFUL_REFUSAL, HARMLESS_KL)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every coordinate and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _finite(point: Sequence[float | None]) -> bool:
    return all(v is not None and isinstance(v, (int, float)) and math.isfinite(v) for v in point)


def weakly_dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every coordinate (all minimised): equal points cover each other."""
    return all(x <= y for x, y in zip(a, b, strict=True))


def set_coverage(ours: Sequence[Sequence[float]], theirs: Sequence[Sequence[float]]) -> float:
    """Zitzler & Thiele's (1999) set coverage C(ours, theirs): the share of ``theirs`` that some point of ``ours``
    weakly dominates. 1 means ours is at least as good everywhere theirs has a point; C(a, b) and C(b, a) are
    both needed (neither is 1 − the other). Empty ``theirs`` has nothing to cover: NaN, not a vacuous 1."""
    if not theirs:
        return math.nan
    return sum(any(weakly_dominates(a, b) for a in ours) for b in theirs) / len(theirs)


def best_within(points: Sequence[Sequence[float]], budget: float) -> int | None:
    """Index of the lowest first coordinate (refusal) among ``points`` whose second (KL) is at most ``budget``,
    the lower KL on a tie; None where no point is that cheap (a point with a missing coordinate never counts). "Our
    best at their cost" in a front comparison."""
    cheap = [i for i, p in enumerate(points) if _finite(p) and p[1] <= budget]
    return min(cheap, key=lambda i: (points[i][0], points[i][1])) if cheap else None


def pareto_front(points: Sequence[Sequence[float | None]]) -> list[int]:
    """Indices (ascending) of the non-dominated points, every coordinate minimised. Equal points do not
    dominate each other, so duplicates on the front all stay; a point with a missing or non-finite
    coordinate is never on it (and dominates nothing)."""
    valid = [i for i, p in enumerate(points) if _finite(p)]
    return [i for i in valid if not any(dominates(points[j], points[i]) for j in valid if j != i)]


def mark_front(rows: list[dict[str, Any]]) -> None:
    """Set ``row["pareto"]``: on the (harmful refusal, next-token KL) front of its model's runs, every
    intervention and trial together (KL is only comparable within one model). A run that did not meet its
    ``eval.constraints`` (``feasible`` false) is never on it and dominates nothing."""
    for model in dict.fromkeys(r.get("model") for r in rows):
        mine = [r for r in rows if r.get("model") == model]
        front = set(pareto_front([tuple(r.get(k) for k in FRONT) if r.get("feasible", True) else (None,) * len(FRONT)
                                  for r in mine]))
        for i, row in enumerate(mine):
            row["pareto"] = i in front
