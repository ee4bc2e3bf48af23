"""Old import paths kept for compatibility: plugins and notebooks written against the flat layout
(``refusal.hooks``, ``refusal.evaluation``...) keep working after the regrouping (docs/ARCHITECTURE.md).

Each old name is an alias of the module that moved, not a copy: ``refusal.hooks is refusal.runtime.hooks``,
so a monkeypatch or an ``isinstance`` through either name sees the same objects. The alias is made on the
first import of the old name, so ``import refusal`` loads nothing extra. New code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old dotted name -> where the module lives now.
MOVED: dict[str, str] = {
    "refusal.hooks": "refusal.runtime.hooks",
    "refusal.prefix": "refusal.runtime.prefix",
    "refusal.activations": "refusal.runtime.activations",
    "refusal.generation": "refusal.runtime.generation",
    "refusal.decoding": "refusal.runtime.decoding",
    "refusal.plugin_registry": "refusal.registry",
    "refusal.pipeline": "refusal.fits",
    "refusal.trial": "refusal.evaluation.trial",
    "refusal.search": "refusal.evaluation.search",
    "refusal.cli": "refusal.app.startup",
    "refusal.hydra_callbacks": "refusal.app.hydra_callbacks",
    "refusal.training": "refusal.app.train",
    "refusal.report_plots": "refusal.report.plots",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name in :data:`MOVED` and hands back the moved module itself."""

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=False)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The moved module ran when it was imported under its own name: nothing to do."""


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
