"""refusal: steer refusal in open-weight chat models with DiM and INLP interventions.

The notebook API (:mod:`refusal.api`) is reachable from here: ``refusal.load``, ``refusal.fit``,
``refusal.build_intervention``, ``refusal.generate``, ``refusal.judge``, ``refusal.compose_config`` and
``refusal.load_model``. It loads on first use, so ``import refusal`` (and every command's start-up) stays
light; old module paths of the flat layout keep working (:mod:`refusal._compat`).
"""

from importlib import import_module
from typing import Any

from refusal import _compat

__version__ = "0.1.0"
API = ("RunContext", "build_intervention", "compose_config", "fit", "generate", "judge", "load", "load_model")

_compat.install()


def __getattr__(name: str) -> Any:
    """``refusal.load`` and the other API names, from :mod:`refusal.api` on first use."""
    if name in API:
        return getattr(import_module("refusal.api"), name)
    raise AttributeError(f"module 'refusal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
