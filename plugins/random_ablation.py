"""Control baseline: ablate a random direction instead of the refusal direction.

If ablating a random unit vector (seeded, drawn once per model) also suppressed refusal, the DiM
result would say little; a good refusal direction beats this control by a wide margin.
"""

from __future__ import annotations

import torch

from refusal.hooks import HookSpec
from refusal.interventions import Intervention
from refusal.interventions.builtin import project_out
from refusal.models.bundle import ModelBundle


class RandomDirectionAblation(Intervention):
    name = "random_ablation"
    description = "Control: directional ablation of a seeded random direction (same hooks as dim_ablation)."
    needs = frozenset({"dim"})

    def _unit(self, d_model: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)))
        v = torch.randn(d_model, generator=generator)
        return v / v.norm()

    @property
    def layer(self) -> int:
        return self.fitted.dim.layer

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return project_out(x, self._unit(x.shape[-1]).to(x))

    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        unit = self._tensor(self._unit(bundle.d_model), bundle)

        def fn(x: torch.Tensor) -> torch.Tensor:
            return project_out(x, unit)

        layout = bundle.layout
        return [
            *[HookSpec(b, fn, "pre") for b in layout.blocks],
            *[HookSpec(m, fn, "post") for m in (*layout.attn_writers, *layout.mlp_writers)],
            HookSpec(layout.final_norm, fn, "pre"),
        ]
