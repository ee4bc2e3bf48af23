"""Name -> Judge class: built-ins, ``plugins/`` files (the same folders as interventions), entry points."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from refusal.plugin_registry import Registry

if TYPE_CHECKING:
    from refusal.judges.base import Judge


def _builtins() -> None:
    import refusal.judges.ensemble  # noqa: F401  (registers on import)
    import refusal.judges.model_judge  # noqa: F401
    import refusal.judges.substring  # noqa: F401


JUDGES: Registry[Judge] = Registry("judge", "refusal.judges", _builtins)


def get_judge(name: str, plugin_dirs: list[str | Path] | None = None) -> type[Judge]:
    return JUDGES.get(name, plugin_dirs)


def available_judges(plugin_dirs: list[str | Path] | None = None) -> dict[str, str]:
    return JUDGES.available(plugin_dirs)
