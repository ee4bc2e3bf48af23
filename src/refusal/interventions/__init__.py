"""Interventions: the abstract base, the registry and the built-ins."""

from refusal.interventions.base import DiMDirection, DiMMeans, Fitted, Intervention
from refusal.interventions.registry import available, get_intervention, load_plugin_dir, register

__all__ = ["DiMDirection", "DiMMeans", "Fitted", "Intervention", "available", "get_intervention", "load_plugin_dir", "register"]
