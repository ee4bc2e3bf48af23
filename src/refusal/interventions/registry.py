"""Name -> Intervention class, filled by built-ins, ``plugins/`` files and entry points."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from refusal.registry import PluginImportError, Registry, load_plugin_dir

if TYPE_CHECKING:
    from refusal.interventions.base import Intervention

__all__ = ["PluginImportError", "available", "get_intervention", "load_plugin_dir", "register"]


#: Filled as classes are defined: the package ``refusal.interventions`` imports the built-ins.
INTERVENTIONS: Registry[Intervention] = Registry("intervention", "refusal.interventions")
register = INTERVENTIONS.register


def available(plugin_dirs: list[str | Path] | None = None) -> dict[str, str]:
    """Registered names with their one-line descriptions."""
    return INTERVENTIONS.available(plugin_dirs)


def get_intervention(name: str, plugin_dirs: list[str | Path] | None = None) -> type[Intervention]:
    return INTERVENTIONS.get(name, plugin_dirs)
