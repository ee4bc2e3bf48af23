"""Constraints on a run's metrics (``eval.constraints``), e.g. "MMLU drop ≤ 1 point" for a Pareto search.

Each constraint is a string ``"<metric> >= <number>"`` or ``"<metric> <= <number>"``, e.g.
``"capability/mmlu/accuracy_vs_baseline >= -0.01"`` (the steered model's MMLU accuracy at most one point
below the unsteered model's on the same items). A run records the constraints it ran under
(``results.json``: ``constraints``) and whether it met them (``metrics["feasible"]``); the sweep report's
Pareto front keeps only runs that met theirs. Why not Optuna's ``constraints_func``: in the pinned Optuna
(2.10) only NSGA-II takes one, and NSGA-II's first generation (50 trials by default) is random search, longer
than a whole 24-trial search here; the search instead gets the constrained metric as a third objective
(``eval.optimize``), which TPE uses from its first guided trial, and the front is filtered by the constraint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from refusal.errors import ConfigError

_FORM = re.compile(r"^\s*(?P<key>[\w./-]+)\s*(?P<op>>=|<=)\s*(?P<bound>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")
EXAMPLE = "eval.constraints=['capability/mmlu/accuracy_vs_baseline >= -0.01']"


@dataclass(frozen=True)
class Constraint:
    key: str
    op: str  # ">=" or "<="
    bound: float

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the bound (the bound itself does); a non-finite value never does."""
        if not math.isfinite(value):
            return False
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.bound:g}"


def parse_constraints(values: Iterable[Any] | None) -> list[Constraint]:
    """``eval.constraints`` as :class:`Constraint` s; one clear error for a malformed entry."""
    if values is None:
        return []
    if isinstance(values, str):
        raise ConfigError(f"eval.constraints={values!r} must be a list of strings, e.g. {EXAMPLE}")
    out = []
    for value in values:
        found = _FORM.match(value) if isinstance(value, str) else None
        if found is None:
            raise ConfigError(f"eval.constraints entry {value!r} is not '<metric> >= <number>' or '<metric> <= <number>', "
                              f"e.g. {EXAMPLE}")
        out.append(Constraint(found["key"], found["op"], float(found["bound"])))
    return out


def feasible(metrics: Mapping[str, Any], constraints: Iterable[Constraint]) -> bool:
    """Every constraint met by ``metrics`` (a metric the run did not measure fails its constraint)."""
    return all(isinstance(metrics.get(c.key), (int, float)) and c.met(float(metrics[c.key])) for c in constraints)
