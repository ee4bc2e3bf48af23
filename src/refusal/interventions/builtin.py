"""The interventions the study compares: baseline, DiM actadd / ablation, INLP nullspace / flip.

Notation: r is the DiM direction at the chosen layer and position, r̂ = r/|r|; W_k holds the
first k orthonormal INLP directions (rows) and μ a centre (midpoint of the class means by default).
"""

from __future__ import annotations

from typing import Any

import torch

from refusal.errors import ConfigError
from refusal.hooks import HookSpec
from refusal.interventions.base import Intervention
from refusal.models.bundle import ModelBundle


class NoIntervention(Intervention):
    name = "none"
    description = "Baseline: the unsteered model."

    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        return []


def _float(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"intervention.{key} must be a number, got {value!r}")
    return float(value)


class ActAdd(Intervention):
    """x ← x + c·r at the input of one block, every position (c=+1 induces, c=−1 suppresses)."""

    name = "actadd"
    description = "DiM activation addition: x + c·r at one layer (c=-1 suppresses, +1 induces refusal)."
    needs = frozenset({"dim"})

    def __init__(self, cfg: dict[str, Any], fitted):
        super().__init__(cfg, fitted)
        self.coeff = _float(self.cfg, "coeff", -1.0)
        layer = self.cfg.get("layer")
        self._layer = int(layer) if layer is not None else fitted.dim.layer

    @property
    def layer(self) -> int:
        return self._layer

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.coeff * self.fitted.dim.direction.to(x)

    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        shift = self.coeff * self._tensor(self.fitted.dim.direction, bundle)
        block = bundle.layout.blocks[self._check_layer(self._layer, bundle)]
        return [HookSpec(block, lambda x: x + shift, "pre")]


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x − (x·r̂) r̂ over the last dimension."""
    return x - (x @ unit).unsqueeze(-1) * unit


class DiMAblation(Intervention):
    """Project r̂ out of every block input and every attention/MLP write, at all positions."""

    name = "dim_ablation"
    description = "DiM directional ablation: remove r̂ from the residual stream at every layer."
    needs = frozenset({"dim"})

    @property
    def layer(self) -> int:
        return self.fitted.dim.layer

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return project_out(x, self.fitted.dim.unit.to(x))

    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        unit = self._tensor(self.fitted.dim.unit, bundle)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return project_out(x, unit)

        layout = bundle.layout
        specs = [HookSpec(block, fn, "pre") for block in layout.blocks]
        specs += [HookSpec(m, fn, "post") for m in (*layout.attn_writers, *layout.mlp_writers)]
        specs.append(HookSpec(layout.final_norm, fn, "pre"))
        return specs


class _INLPBase(Intervention):
    needs = frozenset({"inlp"})
    _CENTRES = ("midpoint", "zero", "harmful_mean", "harmless_mean")

    def __init__(self, cfg: dict[str, Any], fitted):
        super().__init__(cfg, fitted)
        inlp = fitted.inlp
        rank = int(inlp.directions.shape[0])
        k = self.cfg.get("k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= rank):
            raise ConfigError(f"intervention.k={k!r} must be an int in 1..{rank} (the fitted INLP rank), or null for all")
        self.k = rank if k is None else k
        centre = self.cfg.get("center", "midpoint")
        if centre not in self._CENTRES:
            raise ConfigError(f"intervention.center={centre!r} must be one of {self._CENTRES}")
        self.centre = {
            "midpoint": inlp.center,
            "zero": torch.zeros_like(inlp.center),
            "harmful_mean": inlp.mean_harmful,
            "harmless_mean": inlp.mean_harmless,
        }[centre]
        self.W = inlp.directions[: self.k]
        layer = self.cfg.get("layer")
        if layer is None:
            layer = fitted.inlp_layer if fitted.inlp_layer is not None else fitted.dim.layer
        self._layer = int(layer)

    @property
    def layer(self) -> int:
        return self._layer

    def params(self) -> dict[str, Any]:
        return {**super().params(), "k": self.k}

    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        W = self._tensor(self.W, bundle)
        mu = self._tensor(self.centre, bundle)
        extra = self._hook_tensors(bundle)
        block = bundle.layout.blocks[self._check_layer(self._layer, bundle)]
        return [HookSpec(block, lambda x: self._apply(x, W, mu, *extra), "pre")]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        extra = [t.to(x) for t in self._extra_tensors()]
        return self._apply(x, self.W.to(x), self.centre.to(x), *extra)

    def _extra_tensors(self) -> list[torch.Tensor]:
        return []

    def _hook_tensors(self, bundle: ModelBundle) -> list[torch.Tensor]:
        return [t.to(device=bundle.device, dtype=bundle.dtype) for t in self._extra_tensors()]

    @staticmethod
    def _apply(x: torch.Tensor, W: torch.Tensor, mu: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class INLPNullspace(_INLPBase):
    """x ← x − W_kᵀW_k(x − μ): remove the rowspace component relative to the centre."""

    name = "inlp_nullspace"
    description = "INLP nullspace projection: x - W_k^T W_k (x - mu) at one layer."

    @staticmethod
    def _apply(x: torch.Tensor, W: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        return x - ((x - mu) @ W.T) @ W


class INLPFlip(_INLPBase):
    """AlterRep-style counterfactual: each rowspace coordinate c_i ← α·|c_i|·s_i (s_i = target's side)."""

    name = "inlp_flip"
    description = "INLP counterfactual flip: move rowspace coordinates to the target class's side (AlterRep)."

    def __init__(self, cfg: dict[str, Any], fitted):
        super().__init__(cfg, fitted)
        self.alpha = _float(self.cfg, "alpha", 1.0)
        target = self.cfg.get("target", "harmless")
        if target not in ("harmless", "harmful"):
            raise ConfigError(f"intervention.target={target!r} must be 'harmless' (suppress) or 'harmful' (induce)")
        inlp = fitted.inlp
        target_mean = inlp.mean_harmless if target == "harmless" else inlp.mean_harmful
        signs = torch.sign((target_mean - self.centre) @ self.W.T)
        self.signs = torch.where(signs == 0, torch.ones_like(signs), signs)

    def _extra_tensors(self) -> list[torch.Tensor]:
        return [self.alpha * self.signs]

    @staticmethod
    def _apply(x: torch.Tensor, W: torch.Tensor, mu: torch.Tensor, scaled_signs: torch.Tensor) -> torch.Tensor:
        coords = (x - mu) @ W.T
        return x + (coords.abs() * scaled_signs - coords) @ W
