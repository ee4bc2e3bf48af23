"""Name -> Intervention class, filled by built-ins, ``plugins/`` files and entry points."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from refusal.errors import ConfigError

if TYPE_CHECKING:
    from refusal.interventions.base import Intervention

ENTRY_POINT_GROUP = "refusal.interventions"
_REGISTRY: dict[str, type[Intervention]] = {}
_LOADED_DIRS: set[Path] = set()
_ENTRY_POINTS_LOADED = False


def _origin(cls: type) -> str:
    try:
        return inspect.getfile(cls)
    except TypeError:
        return cls.__module__


def register(cls: type[Intervention]) -> type[Intervention]:
    """Register ``cls`` under ``cls.name``; a second class with the same name is an error."""
    name = cls.name
    existing = _REGISTRY.get(name)
    if existing is not None and (_origin(existing), existing.__qualname__) != (_origin(cls), cls.__qualname__):
        raise ConfigError(
            f"intervention name {name!r} is defined twice: in {_origin(existing)} and in {_origin(cls)}; rename one"
        )
    _REGISTRY[name] = cls
    return cls


class PluginImportError(ConfigError):
    """A plugin file or entry point failed to import."""


def load_plugin_dir(folder: str | Path) -> list[str]:
    """Import every ``*.py`` in ``folder`` (once); return the names they registered."""
    folder = Path(folder).resolve()
    if folder in _LOADED_DIRS or not folder.is_dir():
        return []
    before = set(_REGISTRY)
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module_name = f"refusal_plugins.{path.stem}_{abs(hash(str(path))) % 10**8}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except ConfigError:
            sys.modules.pop(module_name, None)
            raise
        except Exception as err:
            sys.modules.pop(module_name, None)
            raise PluginImportError(f"intervention plugin {path} failed to import: {type(err).__name__}: {err}") from err
    _LOADED_DIRS.add(folder)
    return sorted(set(_REGISTRY) - before)


def load_entry_points() -> None:
    """Import interventions that installed packages declare in the ``refusal.interventions`` group."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:
            raise PluginImportError(f"intervention entry point {ep.name} = {ep.value} failed to import: {err}") from err
        if inspect.isclass(obj) and getattr(obj, "name", None) and obj.name not in _REGISTRY:
            register(obj)
    _ENTRY_POINTS_LOADED = True


def _ensure_builtins() -> None:
    import refusal.interventions.builtin  # noqa: F401  (registers on import)
    import refusal.interventions.leace  # noqa: F401


def available(plugin_dirs: list[str | Path] | None = None) -> dict[str, str]:
    """Registered names with their one-line descriptions."""
    _ensure_builtins()
    for folder in plugin_dirs or []:
        load_plugin_dir(folder)
    load_entry_points()
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}


def get_intervention(name: str, plugin_dirs: list[str | Path] | None = None) -> type[Intervention]:
    names = available(plugin_dirs)
    if name not in names:
        raise ConfigError(f"unknown intervention {name!r}; registered: {', '.join(names)} (plugins: {plugin_dirs or []})")
    return _REGISTRY[name]
