"""Collect activations from a model with and without an intervention, then measure and plot.

The unsteered residuals come from the activation cache; the steered ones are extracted with the
intervention's hooks active (our capture hooks run after its hooks, so they see what the next
block receives). Everything is read at the DiM position of the post-instruction tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from refusal.artifacts import atomic_write_text
from refusal.geometry.plots import plot_landing, plot_layer_table
from refusal.geometry.stats import LinearProbe, fit_probe, format_table, landing_stats, layer_table
from refusal.interventions.base import Fitted, Intervention


def steered_activations(ctx: Any, intervention: Intervention, split: str, position: int | None = None) -> torch.Tensor:
    """``[n, n_layers + 1, P, d]`` residuals of ``split`` with the intervention applied (cached by its
    fingerprint); with ``position``, ``[n, n_layers + 1, d]`` at that position only."""
    with intervention.apply(ctx.bundle):
        return ctx.cache.get(
            ctx.bundle, ctx.tokens(split), len(ctx.bundle.post_instruction_ids), position=position,
            steer=intervention.fingerprint(ctx.bundle.n_layers), **ctx.extraction(f"{intervention.name} {split}"),
        )


def probe_at(ctx: Any, site: int, position: int):
    harm = ctx.activations("harmful_train", layer=site, position=position)
    safe = ctx.activations("harmless_train", layer=site, position=position)
    X = torch.cat([harm, safe])
    y = torch.cat([torch.ones(len(harm)), torch.zeros(len(safe))]).long()
    return fit_probe(X, y)


def landing_sites(ctx: Any, layer: int) -> list[int]:
    """The intervention layer and the configured downstream layers that exist in the model."""
    downstream = [int(d) for d in ctx.cfg.geometry.get("downstream", [])]
    return [s for s in [layer, *(layer + d for d in downstream)] if s <= ctx.bundle.n_layers]


def landing_at(
    ctx: Any, fitted: Fitted, intervention: Intervention, probes: Mapping[int, LinearProbe]
) -> tuple[dict[int, dict[str, Any]], dict[str, torch.Tensor]]:
    """Landing statistics of ``intervention`` at each site of ``probes`` (site -> probe on unsteered train data).

    Returns the per-site statistics and the residuals at the DiM position (all layers) that
    they were computed from: ``base_harmful``, ``base_harmless``, ``steered_harmful``, ``steered_harmless``.
    The probes are passed in because they depend only on the site, not on the intervention.
    """
    position = fitted.dim.position
    acts = {"base_harmful": ctx.activations("harmful_test", position=position),
            "base_harmless": ctx.activations("harmless_test", position=position)}
    if intervention.hook_specs(ctx.bundle):
        acts["steered_harmful"] = steered_activations(ctx, intervention, "harmful_test", position)
        acts["steered_harmless"] = steered_activations(ctx, intervention, "harmless_test", position)
    else:
        acts["steered_harmful"], acts["steered_harmless"] = acts["base_harmful"], acts["base_harmless"]
    per_site = {}
    for site, probe in probes.items():
        harm, safe = acts["base_harmful"][:, site], acts["base_harmless"][:, site]
        stats = landing_stats(harm, safe, acts["steered_harmful"][:, site], probe)
        flipped = landing_stats(safe, harm, acts["steered_harmless"][:, site])
        per_site[site] = {**stats, "harmless_axis_coordinate": flipped["axis_coordinate"]}
    return per_site, acts


def run_geometry(ctx: Any, fitted: Fitted, intervention: Intervention, output_dir: Path) -> dict[str, Any]:
    """Landing statistics at the intervention layer and downstream, a per-layer table, and plots."""
    bundle = ctx.bundle
    layer = intervention.layer if intervention.layer is not None else fitted.dim.layer
    position = fitted.dim.position
    probes = {site: probe_at(ctx, site, position) for site in landing_sites(ctx, layer)}
    per_site, acts = landing_at(ctx, fitted, intervention, probes)
    base_harm, base_safe = acts["base_harmful"], acts["base_harmless"]
    steered_harm, steered_safe = acts["steered_harmful"], acts["steered_harmless"]
    unit = fitted.dim.unit
    table_base = layer_table(base_harm.transpose(0, 1), base_safe.transpose(0, 1), unit)
    table_steered = layer_table(steered_harm.transpose(0, 1), steered_safe.transpose(0, 1), unit)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = intervention.name
    landing_png = plot_landing(
        base_harm[:, layer], base_safe[:, layer], {name: steered_harm[:, layer]}, output_dir / "geometry_landing.png",
        title=f"{bundle.name}, layer {layer}: where {name} moves harmful activations", probe=probes[layer],
    )
    table_png = plot_layer_table(table_steered, output_dir / "geometry_layers.png",
                                 title=f"{bundle.name} with {name}: class geometry per layer")
    atomic_write_text(
        output_dir / "geometry.md",
        f"## Unsteered, per layer\n\n{format_table(table_base)}\n\n## With {name}, per layer\n\n{format_table(table_steered)}\n",
    )
    return {
        "layer": layer,
        "position": position,
        "landing": {**per_site[layer], **(intervention.expected_landing(fitted.dim.direction) or {})},
        "downstream": {str(s): v for s, v in per_site.items() if s != layer},
        "layers_unsteered": table_base,
        "layers_steered": table_steered,
        "plots": [str(landing_png), str(table_png)],
    }
