"""Geometry of steered activations: where interventions move harmful activations, per layer.

Model-free: everything takes activation tensors collected elsewhere. ``stats`` computes the
numbers (landing statistics, linear probe, per-layer table), ``plots`` draws them.
"""

from __future__ import annotations

from refusal.geometry.plots import plot_landing, plot_layer_table
from refusal.geometry.stats import (
    LANDING_THRESHOLDS,
    LandingThresholds,
    LinearProbe,
    axis_coordinates,
    fit_probe,
    format_table,
    landing_label,
    landing_stats,
    layer_table,
)

__all__ = [
    "LANDING_THRESHOLDS",
    "LandingThresholds",
    "LinearProbe",
    "axis_coordinates",
    "fit_probe",
    "format_table",
    "landing_label",
    "landing_stats",
    "layer_table",
    "plot_landing",
    "plot_layer_table",
]
