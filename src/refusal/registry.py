"""Registries of named plugin classes (interventions, judges), filled by built-ins, plugin files and
entry points. A plugin file may define classes of any kind: importing it registers them all.
The built-ins register when their package is imported (``refusal.interventions``, ``refusal.judges``)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Generic, TypeVar

from refusal.errors import ConfigError

T = TypeVar("T")
_LOADED_DIRS: set[Path] = set()
_ALL: list[Registry] = []


class PluginImportError(ConfigError):
    """A plugin file or entry point failed to import."""


def _origin(cls: type) -> str:
    try:
        return inspect.getfile(cls)
    except TypeError:
        return cls.__module__


def load_plugin_dir(folder: str | Path) -> list[str]:
    """Import every ``*.py`` in ``folder`` (once); return the names they registered, of any kind."""
    folder = Path(folder).resolve()
    if folder in _LOADED_DIRS or not folder.is_dir():
        return []
    before = {id(r): set(r.classes) for r in _ALL}
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
            raise PluginImportError(f"plugin {path} failed to import: {type(err).__name__}: {err}") from err
    _LOADED_DIRS.add(folder)
    return sorted(name for r in _ALL for name in set(r.classes) - before.get(id(r), set()))


class Registry(Generic[T]):
    """Name -> class for one kind of plugin (``kind`` names it in errors)."""

    def __init__(self, kind: str, entry_point_group: str, builtins: Callable[[], None] | None = None):
        """``builtins``: registers built-ins on first lookup, for a registry whose package does not import them."""
        self.kind, self.group, self._builtins = kind, entry_point_group, builtins
        self.classes: dict[str, type[T]] = {}
        self._entry_points_loaded = False
        _ALL.append(self)

    def register(self, cls: type[T]) -> type[T]:
        """Register ``cls`` under ``cls.name``; a second class with the same name is an error."""
        name = cls.name
        existing = self.classes.get(name)
        if existing is not None and (_origin(existing), existing.__qualname__) != (_origin(cls), cls.__qualname__):
            raise ConfigError(f"{self.kind} name {name!r} is defined twice: in {_origin(existing)} and in "
                              f"{_origin(cls)}; rename one")
        self.classes[name] = cls
        return cls

    def load_entry_points(self) -> None:
        """Import the classes installed packages declare in this registry's entry-point group."""
        if self._entry_points_loaded:
            return
        for ep in entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as err:
                raise PluginImportError(f"{self.kind} entry point {ep.name} = {ep.value} failed to import: {err}") from err
            if inspect.isclass(obj) and getattr(obj, "name", None) and obj.name not in self.classes:
                self.register(obj)
        self._entry_points_loaded = True

    def available(self, plugin_dirs: list[str | Path] | None = None) -> dict[str, str]:
        """Registered names with their one-line descriptions."""
        if self._builtins is not None:
            self._builtins()
        for folder in plugin_dirs or []:
            load_plugin_dir(folder)
        self.load_entry_points()
        return {name: cls.description for name, cls in sorted(self.classes.items())}

    def get(self, name: str, plugin_dirs: list[str | Path] | None = None) -> type[T]:
        names = self.available(plugin_dirs)
        if name not in names:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {', '.join(names)} (plugins: {plugin_dirs or []})")
        return self.classes[name]
