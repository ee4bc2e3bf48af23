"""Control: ablate a random k-dimensional subspace instead of a fitted one.

k=1 at every layer is the control for DiM ablation (does removing *any* direction suppress
refusal?); k = the INLP rank at INLP's scope is the control for INLP nullspace projection (does
removing *any* subspace of that size do what INLP's does?). The subspace is drawn once per seed
and model width (an orthonormal basis of a Gaussian matrix), so runs are reproducible.

Like ``inlp_nullspace`` it is taken about a centre μ: x ← x − QᵀQ(x − μ), the Q-coordinates set to
μ's, so it removes what nullspace removes along its own subspace (the spread about μ, not the
residual stream's mean offset along Q as well). ``center`` takes nullspace's values and default
(``midpoint``); μ is the INLP fit's (each layer's own with ``fit.inlp.per_layer``), hence
``needs`` "inlp": DiM keeps only the mean difference, so no other fit holds the class means.
``center=zero`` is the uncentred x − QᵀQx, the like-for-like control for DiM ablation (k=1).
Writes (attention/MLP outputs at ``layers=all``) are increments and are projected without the
centre, as nullspace's are.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from refusal.errors import ConfigError
from refusal.hooks import TensorFn
from refusal.interventions import Intervention
from refusal.interventions.base import Cast, Fitted
from refusal.interventions.builtin import inlp_centre, inlp_centre_name, inlp_fit_at, project_out_subspace


def random_subspace(d_model: int, k: int, seed: int) -> Float[torch.Tensor, "k d_model"]:
    """k orthonormal rows spanning a uniformly random subspace of R^d (QR of a seeded Gaussian)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_model, k, generator=generator, dtype=torch.float64))
    return q.T.to(torch.float32)


class RandomSubspaceAblation(Intervention):
    name = "random_ablation"
    description = ("Control: ablate a seeded random k-dim subspace about INLP's centre "
                   "(k=1 center=zero: DiM ablation's control; k=INLP rank: INLP nullspace's).")
    needs = frozenset({"dim", "inlp"})
    default_layers = "all"
    edits_writes = True
    defaults = {"k": 1, "seed": 0, "center": "midpoint"}

    def __init__(self, cfg: dict[str, Any], fitted: Fitted):
        super().__init__(cfg, fitted)
        self.k, self.seed = self.cfg.get("k", 1), self.cfg.get("seed", 0)
        for key, value in (("k", self.k), ("seed", self.seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "k" else 0):
                raise ConfigError(f"intervention.{key}={value!r} must be an integer >= {1 if key == 'k' else 0}")
        self.centre_name = inlp_centre_name(self.cfg)
        d_model = int(fitted.dim.direction.shape[-1])
        if self.k > d_model:
            raise ConfigError(f"intervention.k={self.k} exceeds the model width {d_model}")
        self.basis = random_subspace(d_model, self.k, self.seed)

    def residual_edit(self, layer: int, cast: Cast) -> TensorFn:
        Q = cast(self.basis)
        if self.centre_name == "zero":
            return lambda x: project_out_subspace(x, Q)
        mu = cast(inlp_centre(inlp_fit_at(self.fitted, layer, self.name), self.centre_name))
        return lambda x: project_out_subspace(x, Q, mu)

    def write_edit(self, layer: int, cast: Cast) -> TensorFn:
        Q = cast(self.basis)  # writes are increments: the linear part, no centre (as inlp_nullspace's)
        return lambda w: project_out_subspace(w, Q)
