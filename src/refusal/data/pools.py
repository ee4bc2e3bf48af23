"""What every data source hands to the splitter: per class, rows for train and held-out rows.

Sources differ only in where rows come from; keeping their output this small means the
cleaning, de-duplication and sampling rules live in one place (:mod:`refusal.data.splits`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from refusal.errors import DataError


class DataWarning(UserWarning):
    """Data was usable but changed on the way in (duplicates or overlaps removed)."""


@dataclass(frozen=True)
class Pool:
    """One class's rows.

    ``train`` rows may be sampled for train; those not taken become val/test candidates after
    ``held_out``, which is only ever used for val/test (a source's own validation file).
    """

    train: list[str]
    held_out: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RawData:
    harmful: Pool
    harmless: Pool
    source: str  # human description, e.g. "embedded" or "refusal_direction:/path"


def cfg_str(cfg: Mapping[str, Any], key: str, default: str | None = None, *, required_by: str = "") -> str:
    """A string config value; a missing required key names the ``data.<key>`` to set."""
    value = cfg.get(key, default)
    if value is None or value == "???":  # "???" is OmegaConf's mandatory-missing marker
        raise DataError(f"{required_by} needs data.{key}; set it in the data config or pass data.{key}=...")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"data.{key} must be a non-empty string, got {value!r}; fix data.{key}")
    return value.strip()
