"""LEACE as a third family beside DiM and INLP: erase the linear harmfulness information, or reflect it.

``leace_erase``: x ← x − L R (x − b), the least-squares edit after which the harmful and harmless means
coincide (the natural "absence" control: it should land harmful activations between the clusters).
``leace_flip``: x ← x − (1+α) L R (x − m), the erased component reflected through the class-mean
midpoint m and scaled by α, the LEACE analogue of the AlterRep flip (α = 1 maps the harmful mean onto
the harmless one, and applying it twice is the identity). A reflection sends each class to the other
side, so ``target`` only records the intent: harmless = suppress (read on harmful prompts), harmful =
induce (read on harmless prompts).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from refusal.errors import ConfigError
from refusal.interventions.base import Cast, Fitted, Intervention
from refusal.interventions.builtin import finite_number
from refusal.runtime.hooks import TensorFn


class _LEACEBase(Intervention):
    needs = frozenset({"leace"})

    def expected_landing(self, delta: Tensor) -> dict[str, float] | None:
        """For symmetric clusters erasure lands on the midpoint (t = ½), the flip at (1+α)/2; the edit's
        alignment with the DiM difference is reported beside it."""
        leace = self.fitted.leace
        d = delta.to(torch.float64)
        cos = lambda v: float(v.to(torch.float64) @ d / (v.to(torch.float64).norm() * d.norm()))  # noqa: E731
        return {"t_pred": self.landing_factor, "cos_edit_with_dim": cos(leace.proj_left[:, 0]),
                "cos_reader_with_dim": cos(leace.proj_right[0])}

    landing_factor = 0.5


class LEACEErase(_LEACEBase):
    name = "leace_erase"
    description = "LEACE erasure (concept-erasure): remove the linear harmfulness information at one layer."
    edits_writes = True

    def residual_edit(self, layer: int, cast: Cast) -> TensorFn:
        leace = self.fitted.leace
        L, R, b = cast(leace.proj_left.T), cast(leace.proj_right), cast(leace.bias)  # L as [k, d] rows
        return lambda x: x - ((x - b) @ R.T) @ L

    def write_edit(self, layer: int, cast: Cast) -> TensorFn:
        leace = self.fitted.leace
        L, R = cast(leace.proj_left.T), cast(leace.proj_right)
        return lambda w: w - (w @ R.T) @ L


class LEACEFlip(_LEACEBase):
    name = "leace_flip"
    description = "LEACE flip: reflect the erased component through the class-mean midpoint (scaled by alpha)."

    def __init__(self, cfg: dict[str, Any], fitted: Fitted):
        super().__init__(cfg, fitted)
        self.alpha = finite_number(self.cfg, "alpha", 1.0)
        if self.cfg.get("target", "harmless") not in ("harmless", "harmful"):
            raise ConfigError(f"intervention.target={self.cfg.get('target')!r} must be 'harmless' (suppress) or 'harmful' (induce)")

    @property
    def landing_factor(self) -> float:
        return (1 + self.alpha) / 2

    def residual_edit(self, layer: int, cast: Cast) -> TensorFn:
        leace = self.fitted.leace
        L, R, m = cast(leace.proj_left.T), cast(leace.proj_right), cast(leace.midpoint)
        scale = 1.0 + self.alpha
        return lambda x: x - scale * ((x - m) @ R.T) @ L
