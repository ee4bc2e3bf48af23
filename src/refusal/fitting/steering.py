"""Many steered forward passes in one: the model under directional ablation or activation addition,
one candidate direction per group of rows, differentiable in the directions.

RDO optimises directions through these passes and COSMIC scores candidates with them, so both see
the model exactly as the interventions edit it: ablation at every block input and every attention/MLP
write (DiM ablation's scope, uncentred), addition at one block's input. A :class:`Steerable` is
anything that runs such passes on its two prompt sets; :class:`BundleSteerable` is the real model,
and the tests plant a small linear one with a known answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from refusal.models.bundle import ModelBundle
from refusal.runtime.hooks import HookSpec, hooked
from refusal.runtime.prefix import forward


@dataclass
class Steered:
    """Last-position outputs of ``m`` steered copies of ``n`` prompts."""

    logits: Float[Tensor, "m n vocab"]
    residuals: Float[Tensor, "m n reads d_model"]  # block outputs at the ``read`` layers (empty when none)


class Steerable(Protocol):
    """A model with two prompt sets (``harmful``, ``harmless``) that runs steered passes on either."""

    n_layers: int
    d_model: int

    def run(self, split: str, *, ablate: Float[Tensor, "m d_model"] | None = None,
            add: Float[Tensor, "m d_model"] | None = None, add_layer: int | None = None,
            read: Sequence[int] = ()) -> Steered:
        """``split``'s prompts once per row of ``ablate`` (unit directions projected out everywhere) or of
        ``add`` (vectors added at block ``add_layer``'s input); neither: one unsteered copy."""
        ...


def unit_rows(x: Float[Tensor, "m d_model"]) -> Float[Tensor, "m d_model"]:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class BundleSteerable:
    """:class:`Steerable` on a loaded chat model; gradients flow to ``ablate``/``add`` (the weights are
    frozen by the caller: RDO sets ``requires_grad_(False)``)."""

    def __init__(self, bundle: ModelBundle, prompts: dict[str, list[list[int]]]):
        self.bundle, self.prompts = bundle, prompts
        self.n_layers, self.d_model = bundle.n_layers, bundle.d_model

    def run(self, split: str, *, ablate: Tensor | None = None, add: Tensor | None = None,
            add_layer: int | None = None, read: Sequence[int] = ()) -> Steered:
        rows = self.prompts[split]
        n, layout = len(rows), self.bundle.layout
        dt, dev = self.bundle.dtype, self.bundle.device
        steer = ablate if ablate is not None else add
        m = 1 if steer is None else steer.shape[0]
        specs: list[HookSpec] = []
        if ablate is not None:
            unit = unit_rows(ablate).to(dev, dt).repeat_interleave(n, dim=0)[:, None, :]  # [m·n, 1, d]

            def project(x: Tensor) -> Tensor:
                return x - (x * unit).sum(-1, keepdim=True) * unit

            specs += [HookSpec(b, project, "pre") for b in layout.blocks]
            specs += [HookSpec(w, project, "post") for w in (*layout.attn_writers, *layout.mlp_writers)]
        if add is not None:
            shift = add.to(dev, dt).repeat_interleave(n, dim=0)[:, None, :]
            specs.append(HookSpec(layout.blocks[add_layer], lambda x: x + shift, "pre"))
        if list(read) != sorted(set(read)):
            raise ValueError(f"read={list(read)} must be increasing layer indices (captured in the order blocks run)")
        captured: list[Tensor] = []
        for layer in read:
            specs.append(HookSpec(layout.blocks[layer], lambda x: captured.append(x[:, -1]) or x, "post"))
        with hooked(specs):
            logits = forward(self.bundle, list(rows) * m).logits[:, -1].float()
        residuals = (torch.stack(captured, dim=1).float() if captured
                     else logits.new_zeros(m * n, 0, self.d_model))
        return Steered(logits.view(m, n, -1), residuals.view(m, n, len(read), self.d_model))
