"""The check of a number in the open part of a config, an intervention's parameters (plugins decide their
shape); every fixed group is typed by its schema (:mod:`refusal.schema`)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from refusal.errors import ConfigError


def check_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)
