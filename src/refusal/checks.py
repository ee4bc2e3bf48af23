"""Checks of single config values, shared by every package that reads a config (errors name the key and the fix)."""

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


def check_count(value: Any, key: str, what: str, example: int, least: int = 1) -> int:
    """An integer >= ``least``: a batch size of 0 or -1 would fail deep inside a forward pass, after a fit."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{key}={value!r} must be an integer >= {least} ({what}), e.g. {key}={example}")
    return value


def check_flag(value: Any, key: str) -> bool:
    """A switch given as a string ('no', 'false') would be truthy: only true or false is accepted."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value
