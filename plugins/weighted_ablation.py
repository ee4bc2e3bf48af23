"""Projected, norm-preserving and heretic-weighted directional ablation, all expressible as edited weights.

``projected_ablation``: Arditi et al.'s ablation (the embedding and every attention/MLP write) of
r' = r̂ − (r̂·μ̂)μ̂, μ the harmless train mean where r was read (DiM's layer and position): grimjim's
"projected abliteration" as heretic 1.4.0 applies it (``heretic/main.py``, ``run``,
``orthogonalize_direction``). With ``norm_preserving=true`` each edited column keeps its length
(grimjim's "norm-preserving biprojected abliteration" as abliterix 1.12.2's
``weight_transforms.apply_biprojected_transform`` does it; see :mod:`refusal.interventions.weighted`).

``weighted_ablation``: heretic 1.4.0's parametrised ablation (``heretic/model.py``, ``Model.abliterate``):
a strength per layer from its kernel (max_weight at max_weight_position, falling linearly to
min_weight at min_weight_distance, nothing beyond), separate for attention and MLP writes, along
the DiM direction, heretic's per-layer directions (``direction=per_layer``: layer l's writes use
the direction read at block l's output) or its fractional direction index (``direction=11.3``).
heretic reads directions at the last prompt token; here they are read at the DiM position, and the last
hidden state is the last block's output before the final norm (heretic's, from ``output_hidden_states``,
is after it). With ``direction=per_layer`` the embedding (when edited) takes layer 0's direction. With
its defaults (every weight 1 at every layer, the embedding edited, r̂ unprojected) it is
``dim_ablation``'s ablation (logits equal to 1e-5, tested; dim_ablation also re-projects every block
input). heretic's own choices are projected=true and embedding=false; its default norm preservation
(``row_normalization="full"``, rows) is not ours (columns, see :mod:`refusal.interventions.weighted`).

Both are weight-expressible: ``export=true`` saves the edited checkpoint (logits equal the hooks').
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal.errors import ConfigError
from refusal.fitting.results import Fitted
from refusal.interventions.export import export_plan
from refusal.interventions.weighted import (
    AblationPlan,
    Kernel,
    PlanAblation,
    WriteEdit,
    interpolated_direction,
    projected_direction,
)
from refusal.models.bundle import ModelBundle

PARTS = ("attn", "mlp")
KERNEL_KEYS = ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")
DIRECTION_WORDS = ("dim", "per_layer")


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"intervention.{key}={value!r} must be true or false")
    return value


def _number(cfg: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"intervention.{key}={value!r} must be a finite number" + (" or null" if default is None else ""))
    return float(value)


def _direction(cfg: Mapping[str, Any], n_layers: int | None) -> str | float:
    value = cfg.get("direction", "dim")
    if value in DIRECTION_WORDS:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (n_layers is not None and value >= n_layers - 1):
        upper = f"{n_layers - 1}" if n_layers is not None else "n_layers - 1"
        raise ConfigError(f"intervention.direction={value!r} must be 'dim', 'per_layer' or heretic's direction index, a "
                          f"number in [0, {upper}) (it interpolates between block floor(d)'s and the next block's output)")
    return float(value)


def _unit_rows(directions: Float[Tensor, "sites d_model"]) -> Float[Tensor, "sites d_model"]:
    """Each site's DiM direction normalised (heretic normalises before it interpolates); a zero one is an error
    when used, so it is kept as NaN here and caught by :func:`_checked`."""
    norms = directions.norm(dim=-1, keepdim=True)
    return directions / torch.where(norms > 0, norms, torch.nan)


def _checked(unit: Tensor, where: str) -> Tensor:
    if not bool(torch.isfinite(unit).all()):
        raise ConfigError(f"{where}: the harmful and harmless train means are equal there (zero DiM direction), so there "
                          "is no direction to ablate; use direction=dim or a direction index away from that layer")
    return unit


class ProjectedAblation(PlanAblation):
    """Arditi et al.'s ablation of the projected direction r' (optionally norm-preserving), as weights."""

    name = "projected_ablation"
    description = ("Projected abliteration: ablate r' = r - (r.mu)mu (mu: harmless mean) from the embedding and every "
                   "write; norm_preserving=true keeps each edited column's norm (biprojected). Weight-exportable.")
    needs = frozenset({"dim", "dim_means"})
    defaults = {"projected": True, "norm_preserving": False, "export": False}
    has_kernel = False

    def __init__(self, cfg: dict[str, Any], fitted: Fitted):
        super().__init__(cfg, fitted)
        means = fitted.dim_means
        self.n_layers = int(means.harmful.shape[0]) - 1
        self.check_params(self.cfg, self.n_layers)
        if means.position != fitted.dim.position:
            raise ConfigError(f"{self.name}: the class means were read at position {means.position}, the DiM direction at "
                              f"{fitted.dim.position}; refit both (they come from one fit)")
        self.projected = _flag(self.cfg, "projected", self.defaults["projected"])
        self.norm_preserving = _flag(self.cfg, "norm_preserving", self.defaults["norm_preserving"])
        self.embedding = _flag(self.cfg, "embedding", True)
        self.direction = _direction(self.cfg, self.n_layers) if self.has_kernel else "dim"
        self._plan = self._build_plan()

    @classmethod
    def check_params(cls, cfg: Mapping[str, Any], n_layers: int | None) -> None:
        for key in ("projected", "norm_preserving", "embedding"):
            if key in cfg:
                _flag(cfg, key, True)
        if not cls.has_kernel:
            return
        _direction(cfg, n_layers)
        for part in PARTS:
            values = {key: _number(cfg, f"{part}_{key}", None) for key in KERNEL_KEYS}
            if n_layers is not None:  # null position/distance: the DiM layer / every layer; checked once known
                cls._kernel(values, n_layers, 0).check(n_layers, f"{part}_")
            else:
                Kernel(**{k: 1.0 if v is None else v for k, v in values.items()}).check(10**9, f"{part}_")

    @staticmethod
    def _kernel(values: Mapping[str, float | None], n_layers: int, dim_layer: int) -> Kernel:
        """heretic's kernel from the config; null position: the DiM layer, null distance: every layer."""
        return Kernel(
            max_weight=1.0 if values["max_weight"] is None else values["max_weight"],
            max_weight_position=float(dim_layer) if values["max_weight_position"] is None else values["max_weight_position"],
            min_weight=1.0 if values["min_weight"] is None else values["min_weight"],
            min_weight_distance=float(n_layers) if values["min_weight_distance"] is None else values["min_weight_distance"],
        )

    def kernels(self) -> dict[str, Kernel | None]:
        """Each component's kernel (None: weight 1 at every layer)."""
        if not self.has_kernel:
            return {part: None for part in PARTS}
        return {part: self._kernel({key: _number(self.cfg, f"{part}_{key}", None) for key in KERNEL_KEYS},
                                   self.n_layers, self.fitted.dim.layer) for part in PARTS}

    def _direction_at(self, site: int, units: Tensor) -> Tensor:
        unit = _checked(units[site], f"{self.name}: direction at hidden state {site}")
        if self.projected:
            unit = projected_direction(unit, self.fitted.dim_means.harmless[site], f" at hidden state {site}")
        return unit

    def _build_plan(self) -> AblationPlan:
        dim, means = self.fitted.dim, self.fitted.dim_means
        if self.direction == "dim":
            unit = dim.unit
            if self.projected:
                unit = projected_direction(dim.direction, means.harmless[dim.layer], f" at layer {dim.layer}")
            per_layer = dict.fromkeys(range(self.n_layers), unit)
        else:  # heretic: each site's unit direction, projected against its own harmless mean, then mixed
            units = _unit_rows(means.directions)
            if self.direction == "per_layer":  # layer l's writes: the direction read at block l's output
                per_layer = {layer: self._direction_at(layer + 1, units) for layer in range(self.n_layers)}
            else:
                weight, whole = math.modf(self.direction + 1)
                for site in (int(whole), int(whole) + 1)[: 2 if weight else 1]:  # only the sites it mixes
                    units[site] = self._direction_at(site, units)
                unit = interpolated_direction(units, self.direction)
                per_layer = dict.fromkeys(range(self.n_layers), unit)
        plan = AblationPlan(WriteEdit(per_layer[0], 1.0, self.norm_preserving) if self.embedding else None)
        for part, kernel in self.kernels().items():
            for layer in range(self.n_layers):
                weight = 1.0 if kernel is None else kernel.weight(layer)
                if weight is not None:
                    plan.writes[(layer, part)] = WriteEdit(per_layer[layer], weight, self.norm_preserving)
        return plan

    def weight_plan(self, n_layers: int) -> AblationPlan:
        if n_layers != self.n_layers:
            raise ConfigError(f"{self.name}: fitted for {self.n_layers} layers, applied to a model with {n_layers}; refit")
        return self._plan

    def export_weights(self, bundle: ModelBundle, out_dir: Path) -> Path:
        """The plan baked into a copy of the weights (``intervention.export=true``): the same edit as the hooks."""
        return export_plan(bundle, self.weight_plan(bundle.n_layers), out_dir)


class WeightedAblation(ProjectedAblation):
    """heretic's weighted ablation kernel and direction index as parameters of directional ablation."""

    name = "weighted_ablation"
    description = ("heretic's weighted directional ablation: per-layer strength kernel (attn/MLP), DiM, per-layer or "
                   "fractional-index direction, optional projection and norm preservation. Weight-exportable.")
    defaults = {"direction": "dim", "projected": False, "norm_preserving": False, "embedding": True, "export": False,
                **{f"{part}_{key}": None for part in PARTS for key in KERNEL_KEYS}}
    has_kernel = True
