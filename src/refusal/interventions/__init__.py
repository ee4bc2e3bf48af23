"""Interventions: the abstract base, the registry and the built-ins."""

from refusal.interventions import builtin, leace  # noqa: E402, F401, I001  (the built-ins register on import)
from refusal.interventions.base import DiMDirection, DiMMeans, Fitted, Intervention
from refusal.interventions.registry import available, get_intervention, load_plugin_dir, register

__all__ = ["DiMDirection", "DiMMeans", "Fitted", "Intervention", "available", "get_intervention", "load_plugin_dir", "register"]
