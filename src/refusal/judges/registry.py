"""Name -> Judge class: built-ins, ``plugins/`` files (the same folders as interventions), entry points."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from refusal.registry import Registry

if TYPE_CHECKING:
    from refusal.judges.base import Judge


#: Filled as classes are defined: the package ``refusal.judges`` imports the built-ins.
JUDGES: Registry[Judge] = Registry("judge", "refusal.judges")


def get_judge(name: str, plugin_dirs: list[str | Path] | None = None) -> type[Judge]:
    return JUDGES.get(name, plugin_dirs)


def available_judges(plugin_dirs: list[str | Path] | None = None) -> dict[str, str]:
    return JUDGES.available(plugin_dirs)
