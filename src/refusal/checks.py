"""Checks of single values in the open parts of a config (an intervention's parameters, ``layer``), whose
shape plugins or modes decide; the fixed groups are typed by their schemas (:mod:`refusal.schema`)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from refusal.errors import ConfigError


def check_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def check_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)
