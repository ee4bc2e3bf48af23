"""The interventions the study compares: baseline, DiM actadd / ablation, INLP nullspace / flip.

Notation: r is the DiM direction at the chosen layer and position, r̂ = r/|r|; W_k holds the
first k orthonormal INLP directions (rows) and μ a centre (midpoint of the class means by default).
Each says what it does at one layer; where it acts is its scope (see :mod:`refusal.interventions.scope`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal.errors import ConfigError
from refusal.fitting.capture import capture_curve
from refusal.fitting.inlp import project_out_subspace  # also imported from here by plugins
from refusal.interventions.base import Cast, Fitted, Intervention
from refusal.interventions.export import export_orthogonalized, export_subspace
from refusal.interventions.scope import resolve_k
from refusal.models.bundle import ModelBundle
from refusal.runtime.hooks import HookSpec, TensorFn


class NoIntervention(Intervention):
    name = "none"
    description = "Baseline: the unsteered model."
    steers = False

    @property
    def layer(self) -> None:
        return None

    def layers(self, n_layers: int) -> list[int]:
        return []

    def residual_edit(self, layer: int, cast: Cast) -> TensorFn | None:
        return None

    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        return []


def finite_number(cfg: dict, key: str, default: float) -> float:
    """``cfg[key]`` as a finite float; NaN, ±inf, booleans and strings are config errors."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"intervention.{key} must be a finite number, got {value!r}")
    return float(value)


class ActAdd(Intervention):
    """x ← x + c·r at the input of each block in scope, every position (c=+1 induces, c=−1 suppresses)."""

    name = "actadd"
    description = "DiM activation addition: x + c·r at one layer (c=-1 suppresses, +1 induces refusal)."
    needs = frozenset({"dim"})

    def __init__(self, cfg: dict[str, Any], fitted: Fitted):
        super().__init__(cfg, fitted)
        self.coeff = finite_number(self.cfg, "coeff", -1.0)

    def residual_edit(self, layer: int, cast: Cast) -> TensorFn:
        shift = self.coeff * cast(self.fitted.dim.direction)
        return lambda x: x + shift


def project_out(x: Float[Tensor, "*batch d_model"], unit: Float[Tensor, " d_model"]) -> Float[Tensor, "*batch d_model"]:
    """x − (x·r̂) r̂ over the last dimension."""
    return x - (x @ unit).unsqueeze(-1) * unit


class DiMAblation(Intervention):
    """Project r̂ out of the residual stream; by default at every block input and every attention/MLP write."""

    name = "dim_ablation"
    description = "DiM directional ablation: remove r̂ from the residual stream at every layer."
    needs = frozenset({"dim"})
    default_layers = "all"
    edits_writes = True

    def residual_edit(self, layer: int, cast: Cast) -> TensorFn:
        unit = cast(self.fitted.dim.unit)
        return lambda x: project_out(x, unit)

    def export_weights(self, bundle: ModelBundle, out_dir: Path) -> Path:
        """Orthogonalized weights: every matrix writing to the residual stream has r̂ projected out."""
        return export_orthogonalized(bundle, self.fitted.dim.unit, out_dir)

    write_edit = residual_edit


class SubspaceAblation(Intervention):
    """Base of the ablations of a fitted k-dim subspace (no ``name``: not registered itself): x − QᵀQx for the
    orthonormal rows Q a subclass sets as ``self.basis``, uncentred like DiM ablation, at every block input and
    attention/MLP write, and exportable as weights with that span removed (``intervention.export=true``)."""

    default_layers = "all"
    edits_writes = True
    basis: Float[Tensor, "k d_model"]

    def residual_edit(self, layer: int, cast: Cast) -> TensorFn:
        Q = cast(self.basis)
        return lambda x: project_out_subspace(x, Q)

    write_edit = residual_edit

    def export_weights(self, bundle: ModelBundle, out_dir: Path) -> Path:
        return export_subspace(bundle, self.basis, out_dir)


def _rank(inlp: Any) -> int:
    return int(inlp.directions.shape[0])


#: ``intervention.center`` of the INLP edits (and of their random control): the point the edit is taken about.
INLP_CENTRES = ("midpoint", "zero", "harmful_mean", "harmless_mean")


def inlp_centre_name(cfg: dict[str, Any]) -> str:
    """``intervention.center``, checked (default ``midpoint``)."""
    name = cfg.get("center", "midpoint")
    if name not in INLP_CENTRES:
        raise ConfigError(f"intervention.center={name!r} must be one of {INLP_CENTRES}")
    return name


def inlp_centre(inlp: Any, name: str) -> Float[Tensor, " d_model"]:
    """The centre ``name`` of an INLP fit (``midpoint`` is the fit's stored centre, see ``fit.inlp.center``)."""
    return {"midpoint": inlp.center, "zero": torch.zeros_like(inlp.center),
            "harmful_mean": inlp.mean_harmful, "harmless_mean": inlp.mean_harmless}[name]


def inlp_fit_at(fitted: Fitted, layer: int, who: str):
    """The INLP fit used at ``layer``: its own with ``fit.inlp.per_layer``, else the selected layer's."""
    by_layer = fitted.inlp_by_layer
    if not by_layer:
        return fitted.inlp
    if layer not in by_layer:
        raise ConfigError(f"{who}: no per-layer INLP fit for layer {layer} (fitted: {sorted(by_layer)}); "
                          "let evaluate.py fit the layers in scope, or set fit.inlp.per_layer=false")
    return by_layer[layer]


class _INLPBase(Intervention):
    needs = frozenset({"inlp"})
    k_counts_inlp_directions = True

    def __init__(self, cfg: dict[str, Any], fitted: Fitted):
        super().__init__(cfg, fitted)
        self.centre_name = inlp_centre_name(self.cfg)
        if self._layer is None:
            self._layer = fitted.inlp_layer
        resolve_k(self.cfg.get("k"), _rank(fitted.inlp))  # a bad k fails now, right after fitting, not mid-run
        self._per_layer: dict[int, tuple[Tensor, ...]] = {}

    @property
    def k(self) -> int:
        """Directions used at the selected layer (``intervention.k`` resolved against its fit's rank)."""
        return resolve_k(self.cfg.get("k"), _rank(self.fit_at(self._layer)))

    def fit_at(self, layer: int):
        """The INLP fit used at ``layer``: its own with ``fit.inlp.per_layer``, else the selected layer's."""
        return inlp_fit_at(self.fitted, layer, self.name)

    def tensors_at(self, layer: int) -> tuple[Tensor, ...]:
        """(W_k, μ, *extra) of ``layer`` in float32 on CPU, computed once per layer."""
        if layer not in self._per_layer:
            inlp = self.fit_at(layer)
            k = resolve_k(self.cfg.get("k"), _rank(inlp), f"intervention.k (layer {layer}, rank {_rank(inlp)})")
            centre = inlp_centre(inlp, self.centre_name)
            W = inlp.directions[:k]
            self._per_layer[layer] = (W, centre, *self._extra(inlp, W, centre))
        return self._per_layer[layer]

    def params(self) -> dict[str, Any]:
        return {**super().params(), "k": self.k}

    #: t ≈ landing_factor · capture for symmetric clusters (see refusal.fitting.capture).
    landing_factor: float = 0.5

    def expected_landing(self, delta: Tensor) -> dict[str, float] | None:
        if self.centre_name != "midpoint":
            return None

        W = self.tensors_at(self._layer)[0]
        capture = float(capture_curve(W, delta)[-1]) if W.shape[0] else 0.0
        return {"capture": capture, "t_pred": self.landing_factor * capture}

    def residual_edit(self, layer: int, cast: Cast) -> TensorFn:
        W, mu, *extra = self.tensors_at(layer)
        W, mu = cast(W), cast(mu)
        extra = [t.to(W) for t in extra]  # per-direction values ([k]), not activations
        return lambda x: self._apply(x, W, mu, *extra)

    def _extra(self, inlp: Any, W: Tensor, centre: Tensor) -> list[Tensor]:
        return []

    @staticmethod
    def _apply(x: Tensor, W: Tensor, mu: Tensor, *extra: Tensor) -> Tensor:
        raise NotImplementedError


class INLPNullspace(_INLPBase):
    """x ← x − W_kᵀW_k(x − μ): the rowspace coordinates set to the centre's."""

    name = "inlp_nullspace"
    description = "INLP nullspace projection: x - W_k^T W_k (x - mu) at one layer."
    edits_writes = True

    @staticmethod
    def _apply(x: Tensor, W: Tensor, mu: Tensor) -> Tensor:
        return project_out_subspace(x, W, mu)

    def write_edit(self, layer: int, cast: Cast) -> TensorFn:
        W = cast(self.tensors_at(layer)[0])  # writes are increments: the linear part, no centre
        return lambda w: project_out_subspace(w, W)


class INLPFlip(_INLPBase):
    """AlterRep-style counterfactual: each rowspace coordinate c_i = w_i·(x − μ) ← α·|c_i|·s_i.

    s_i = sign(w_i·(μ_target − μ_other)) is the side of the target class along w_i, whatever the centre
    μ: taken from the centre instead (w_i·(μ_target − μ)) it is 0 when μ is the target's own mean and
    the sign of the target's offset from the origin for ``zero``, which pointed the flip the wrong way.
    """

    name = "inlp_flip"
    description = "INLP counterfactual flip: move rowspace coordinates to the target class's side (AlterRep)."

    def __init__(self, cfg: dict[str, Any], fitted: Fitted):
        self.alpha = finite_number(dict(cfg), "alpha", 1.0)
        self.target = dict(cfg).get("target", "harmless")
        if self.target not in ("harmless", "harmful"):
            raise ConfigError(f"intervention.target={self.target!r} must be 'harmless' (suppress) or 'harmful' (induce)")
        super().__init__(cfg, fitted)

    @property
    def landing_factor(self) -> float:  # the flip reflects (α = 1) or overshoots the captured share
        return (1 + self.alpha) / 2 if self.target == "harmless" else math.nan

    def _extra(self, inlp: Any, W: Tensor, centre: Tensor) -> list[Tensor]:
        harmless = self.target == "harmless"
        target, other = (inlp.mean_harmless, inlp.mean_harmful) if harmless else (inlp.mean_harmful, inlp.mean_harmless)
        signs = torch.sign((target - other) @ W.T)
        tie = -1.0 if harmless else 1.0  # no mean difference along w_i: INLP orients its rows towards harmful
        return [self.alpha * torch.where(signs == 0, torch.full_like(signs, tie), signs)]

    @staticmethod
    def _apply(x: Tensor, W: Tensor, mu: Tensor, scaled_signs: Tensor) -> Tensor:
        coords = (x - mu) @ W.T
        return x + (coords.abs() * scaled_signs - coords) @ W
