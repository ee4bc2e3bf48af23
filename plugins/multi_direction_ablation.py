"""Multi-direction ablation: project a k-dimensional refusal subspace out of the residual stream.

The subspace is DiM's direction r̂ followed by the k−1 leading principal components of the
per-prompt differences (harmful activation minus the harmless mean, at the DiM layer and position)
left once r̂ is removed (see :mod:`refusal.fitting.subspace` for why this basis). k=1 is DiM
ablation exactly; each further row asks whether a second direction adds anything once the first
is removed. Like DiM ablation it acts at every block input and every attention/MLP write, uncentred
(x − QᵀQx), so its control is ``random_ablation`` with the same k and ``center=zero``; ``export=true`` saves the
checkpoint with the subspace removed from the weights (:class:`refusal.interventions.builtin.SubspaceAblation`).

``without_dim=true`` ablates rows 2..k only and keeps DiM's direction. Once DiM ablation leaves almost nothing
refusing, "k directions − DiM ablation" is bounded by that floor and cannot show a second direction at work; the
directions beyond DiM's alone, against a random subspace of their size (``random_ablation`` k−1), can.
"""

from __future__ import annotations

from typing import Any

from refusal.errors import ConfigError
from refusal.interventions.base import Fitted
from refusal.interventions.builtin import SubspaceAblation


def checked_k(cfg: Any, d_model: int | None = None) -> int:
    k = cfg.get("k", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"intervention.k={k!r} must be an integer >= 1 (the number of directions ablated)")
    if d_model is not None and k > d_model:
        raise ConfigError(f"intervention.k={k} exceeds the model width {d_model}")
    return k


def checked_without_dim(cfg: Any) -> bool:
    without = cfg.get("without_dim")
    if without is None:  # the config's default (null, so the runs made before the option stay resumable)
        return False
    if not isinstance(without, bool):
        raise ConfigError(f"intervention.without_dim={without!r} must be true or false")
    if without and checked_k(cfg) < 2:
        raise ConfigError("intervention.without_dim=true keeps DiM's direction and ablates the k-1 beyond it: "
                          f"it needs intervention.k >= 2 (got k={checked_k(cfg)})")
    return without


class MultiDirectionAblation(SubspaceAblation):
    name = "multi_ablation"
    description = "Ablate a k-dim subspace: DiM's direction plus the k-1 leading components of per-prompt differences."
    needs = frozenset({"dim"})
    defaults = {"k": 2, "without_dim": None, "export": None}

    @classmethod
    def check_params(cls, cfg: Any, n_layers: int | None) -> None:
        """A bad k fails before the model loads (where the core calls plugins' checks)."""
        checked_without_dim(cfg)

    @classmethod
    def fit_extra(cls, ctx: Any, fitted: Fitted, cfg: Any) -> dict[str, Any]:
        from refusal.fitting.subspace import difference_components

        dim = fitted.dim
        harmful = ctx.activations("harmful_train", layer=dim.layer, position=dim.position)
        harmless = ctx.activations("harmless_train", layer=dim.layer, position=dim.position)
        basis, explained = difference_components(harmful, harmless.mean(0), checked_k(cfg, harmful.shape[-1]))
        return {"basis": basis, "explained": explained}

    def __init__(self, cfg: dict[str, Any], fitted: Fitted):
        super().__init__(cfg, fitted)
        self.k = checked_k(self.cfg)
        fit = fitted.extra.get(self.name)
        if fit is None or fit["basis"].shape[0] != self.k:
            raise ConfigError(f"intervention {self.name!r} needs its own fit for k={self.k} (fitted.extra"
                              f"[{self.name!r}]); let evaluate.py fit it (refusal.fits.fit_for)")
        self.without_dim = checked_without_dim(self.cfg)
        self.basis = fit["basis"][1:] if self.without_dim else fit["basis"]

    def params(self) -> dict[str, Any]:
        explained = self.fitted.extra[self.name]["explained"]
        return {**super().params(), "explained": [round(float(x), 4) for x in explained]}

