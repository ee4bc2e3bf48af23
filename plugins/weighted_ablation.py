"""Projected, norm-preserving and heretic-weighted directional ablation, all expressible as edited weights.

``projected_ablation``: Arditi et al.'s ablation (the embedding and every attention/MLP write) of
r' = r̂ − (r̂·μ̂)μ̂, μ the harmless train mean where r was read (DiM's layer and position): grimjim's
"projected abliteration" as heretic 1.4.0 applies it (``heretic/main.py``, ``run``,
``orthogonalize_direction``). With ``norm_preserving=true`` each edited column keeps its length
(grimjim's "norm-preserving biprojected abliteration" as abliterix 1.12.2's
``weight_transforms.apply_biprojected_transform`` does it; see :mod:`refusal.interventions.weighted`);
``norm_preserving=rows`` keeps each row's instead (heretic's, with ``embedding=false``).

``weighted_ablation``: heretic 1.4.0's parametrised ablation (``heretic/model.py``, ``Model.abliterate``):
a strength per layer from its kernel (max_weight at max_weight_position, falling linearly to
min_weight at min_weight_distance, nothing beyond), separate for attention and MLP writes, along
the DiM direction, heretic's per-layer directions (``direction=per_layer``: layer l's writes use
the direction read at block l's output) or its fractional direction index (``direction=index
direction_index=11.3``). ``units=fractions`` takes heretic's sampling units (positions, distances and
the index as fractions of the last layer index, min_weight as a fraction of max_weight), so that one
search space (``experiment=pareto_weighted_ablation``, heretic's ranges) fits every model.
heretic reads directions at the last prompt token; here they are read at the DiM position, and the last
hidden state is the last block's output before the final norm (heretic's, from ``output_hidden_states``,
is after it). With ``direction=per_layer`` the embedding (when edited) takes layer 0's direction. With
its defaults (every weight 1 at every layer, the embedding edited, r̂ unprojected) it is
``dim_ablation``'s ablation (logits equal to 1e-5, tested; dim_ablation also re-projects every block
input). heretic's own choices are projected=true, embedding=false and norm_preserving=rows (its default
``row_normalization="full"``, exact here where heretic stores a rank-3 LoRA approximation; see
:mod:`refusal.interventions.weighted`).

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
    Preserve,
    WriteEdit,
    interpolated_direction,
    projected_direction,
)
from refusal.models.bundle import ModelBundle

PARTS = ("attn", "mlp")
KERNEL_KEYS = ("max_weight", "max_weight_position", "min_weight", "min_weight_distance")
DIRECTION_WORDS = ("dim", "per_layer", "index")
UNITS = ("layers", "fractions")


def _flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"intervention.{key}={value!r} must be true or false")
    return value


def _preserve(cfg: Mapping[str, Any]) -> Preserve:
    """``norm_preserving``: false, true (columns, abliterix's biprojected) or rows (heretic's default)."""
    value = cfg.get("norm_preserving", False)
    if value not in (False, True, "rows") or value in (0, 1) and not isinstance(value, bool):
        raise ConfigError(f"intervention.norm_preserving={value!r} must be true (each column's norm, abliterix's), "
                          "rows (each row's norm, heretic's) or false")
    return {False: "none", True: "columns", "rows": "rows"}[value]


def _number(cfg: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"intervention.{key}={value!r} must be a finite number" + (" or null" if default is None else ""))
    return float(value)


def _fractions(cfg: Mapping[str, Any]) -> bool:
    units = cfg.get("units", "layers")
    if units not in UNITS:
        raise ConfigError(f"intervention.units={units!r} must be 'layers' or 'fractions' (heretic's parametrisation: "
                          "positions, distances and the direction index as fractions of the last layer index, "
                          "min_weight as a fraction of max_weight)")
    return units == "fractions"


def _direction(cfg: Mapping[str, Any], n_layers: int | None) -> str | float:
    """'dim', 'per_layer' or heretic's direction index in layers (``direction=index``, ``direction_index``)."""
    value = cfg.get("direction", "dim")
    if value not in DIRECTION_WORDS:
        raise ConfigError(f"intervention.direction={value!r} must be one of {', '.join(DIRECTION_WORDS)} "
                          "(index: heretic's direction_index, set by intervention.direction_index)")
    if value != "index":
        return value
    index = _number(cfg, "direction_index", None)
    if index is None:
        raise ConfigError("intervention.direction=index needs intervention.direction_index (a number: block floor(d)'s "
                          "and the next block's outputs are mixed by frac(d))")
    fractions = _fractions(cfg)
    top = 1.0 if fractions else (None if n_layers is None else float(n_layers - 1))
    if index < 0 or (top is not None and index >= top):
        raise ConfigError(f"intervention.direction_index={index:g} must be in [0, {'n_layers - 1' if top is None else f'{top:g}'})"
                          f"{' (a fraction of the last layer index: units=fractions)' if fractions else ' layers'}: it "
                          "interpolates between block floor(d)'s and the next block's output")
    return index * _last(n_layers) if fractions and n_layers is not None else index


def _last(n_layers: int) -> float:
    """heretic's ``last_layer_index``: what fractional positions, distances and indices are fractions of."""
    return float(n_layers - 1)


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
        self.preserve = _preserve(self.cfg)
        self.embedding = _flag(self.cfg, "embedding", True)
        self.direction = _direction(self.cfg, self.n_layers) if self.has_kernel else "dim"
        self._plan = self._build_plan()

    @classmethod
    def check_params(cls, cfg: Mapping[str, Any], n_layers: int | None) -> None:
        for key in ("projected", "embedding"):
            if key in cfg:
                _flag(cfg, key, True)
        if _preserve(cfg) == "rows" and _flag(cfg, "embedding", True):
            fix = ("set intervention.embedding=false" if cls.has_kernel else
                   "use intervention=weighted_ablation intervention.projected=true intervention.embedding=false "
                   "(projected_ablation always edits the embedding)")
            raise ConfigError(f"{cls.name}: norm_preserving=rows (heretic's) edits the attention/MLP writes only; {fix}, "
                              "or norm_preserving=true to keep the embedding's norms")
        if not cls.has_kernel:
            return
        _direction(cfg, n_layers)
        known = n_layers if n_layers is not None else 10**9  # positions are checked against the model once it loads
        for part in PARTS:  # null position/distance: the DiM layer / every layer
            cls._kernel(cfg, part, known, 0).check(known, f"{part}_")

    @staticmethod
    def _kernel(cfg: Mapping[str, Any], part: str, n_layers: int, dim_layer: int) -> Kernel:
        """One component's kernel in layers; null position: the DiM layer, null distance: every layer. With
        ``units=fractions`` (heretic's sampling) positions and distances are fractions of the last layer
        index and min_weight a fraction of max_weight (heretic/main.py multiplies the same way)."""
        values = {key: _number(cfg, f"{part}_{key}", None) for key in KERNEL_KEYS}
        max_weight = 1.0 if values["max_weight"] is None else values["max_weight"]
        position, min_weight, distance = values["max_weight_position"], values["min_weight"], values["min_weight_distance"]
        if _fractions(cfg):
            for key, value in (("max_weight_position", position), ("min_weight", min_weight)):
                if value is not None and not 0.0 <= value <= 1.0:
                    raise ConfigError(f"intervention.{part}_{key}={value:g} must be in [0, 1] with units=fractions (a "
                                      f"fraction of {'the last layer index' if key == 'max_weight_position' else 'max_weight'})")
            position = None if position is None else position * _last(n_layers)
            distance = None if distance is None else distance * _last(n_layers)
            min_weight = None if min_weight is None else min_weight * max_weight
        return Kernel(
            max_weight=max_weight,
            max_weight_position=float(dim_layer) if position is None else position,
            min_weight=1.0 if min_weight is None else min_weight,
            min_weight_distance=float(n_layers) if distance is None else distance,
        )

    def kernels(self) -> dict[str, Kernel | None]:
        """Each component's kernel in layers (None: weight 1 at every layer)."""
        if not self.has_kernel:
            return {part: None for part in PARTS}
        return {part: self._kernel(self.cfg, part, self.n_layers, self.fitted.dim.layer) for part in PARTS}

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
        plan = AblationPlan(WriteEdit(per_layer[0], 1.0, self.preserve) if self.embedding else None)
        for part, kernel in self.kernels().items():
            for layer in range(self.n_layers):
                weight = 1.0 if kernel is None else kernel.weight(layer)
                if weight is not None:
                    plan.writes[(layer, part)] = WriteEdit(per_layer[layer], weight, self.preserve)
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
    defaults = {"direction": "dim", "direction_index": None, "units": "layers", "projected": False,
                "norm_preserving": False, "embedding": True, "export": False,
                **{f"{part}_{key}": None for part in PARTS for key in KERNEL_KEYS}}
    has_kernel = True
