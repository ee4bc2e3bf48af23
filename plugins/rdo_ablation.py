"""RDO directions and refusal cones, ablated (Wollschläger et al. 2025; fitted by refusal.fits.fit_rdo).

``k=1``: one direction trained by gradient descent with the paper's ablation, addition and retain
losses, started from DiM's; ``k>1``: a refusal cone, a k-dim basis trained so that every direction
sampled in it satisfies the losses. The trained span is ablated like DiM's direction: every block
input and every attention/MLP write, uncentred (x − QᵀQx), weight-exportable (``export=true``). The
fit is a checksummed artifact reused when its settings, model and data match (a fit stopped midway
resumes from its last step's artifact, ``<stem>-progress``); one that did not converge, or whose basis
has rank below k, is a FitError with the numbers (``on_unconverged=warn`` to use it anyway). Its
control is ``random_ablation`` with the same k and ``center=zero``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from refusal.errors import ConfigError
from refusal.fits import fit_rdo
from refusal.fitting.rdo import RDOConfig
from refusal.fitting.results import Fitted
from refusal.interventions.builtin import SubspaceAblation


class RDOAblation(SubspaceAblation):
    name = "rdo_ablation"
    description = "Ablate an RDO-trained refusal direction (k=1) or refusal cone (k>1) at every layer."
    needs = frozenset({"dim"})
    defaults = {**asdict(RDOConfig()), "export": None}

    @classmethod
    def check_params(cls, cfg: Any, n_layers: int | None) -> None:
        """Bad settings fail before the model loads (where the core calls plugins' checks)."""
        RDOConfig.from_cfg(cfg)

    @classmethod
    def fit_extra(cls, ctx: Any, fitted: Fitted, cfg: Any) -> Any:
        return fit_rdo(ctx, fitted.dim, RDOConfig.from_cfg(cfg))

    def __init__(self, cfg: dict[str, Any], fitted: Fitted):
        super().__init__(cfg, fitted)
        self.settings = RDOConfig.from_cfg(self.cfg)  # a bad value fails here too
        fit = fitted.extra.get(self.name)
        if fit is None or fit.basis.shape[0] != self.settings.k:
            raise ConfigError(f"intervention {self.name!r} needs its own fit for k={self.settings.k} (fitted.extra"
                              f"[{self.name!r}]); let evaluate.py fit it (refusal.fits.fit_for)")
        self.basis = fit.basis

    def params(self) -> dict[str, Any]:
        fit = self.fitted.extra[self.name]
        return {**super().params(), "loss_start": round(fit.initial_loss, 4), "loss_best": round(fit.best_loss, 4),
                "best_step": fit.best_step, "converged": fit.converged}


