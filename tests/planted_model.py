"""A small linear model with a planted refusal direction, steered exactly as the real model is
(:class:`refusal.fitting.steering.Steerable`): residual blocks x ← x + W_l x, ablation at every block
input and every write, addition at one block's input, logits U x + c. Token 0 is "refuse" and reads
only the planted direction r*; token 1 ("comply") wins by its bias when r* is absent. The right
answer of RDO and COSMIC is therefore known."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from refusal.fitting.steering import Steered, unit_rows


class PlantedLinearModel:
    def __init__(self, harmful: Tensor, harmless: Tensor, readout: Tensor, bias: Tensor, writes: Tensor):
        self.inputs = {"harmful": harmful, "harmless": harmless}
        self.readout, self.bias, self.writes = readout, bias, writes  # [vocab, d], [vocab], [n_layers, d, d]
        self.n_layers, self.d_model = writes.shape[0], harmful.shape[1]

    @classmethod
    def planted(cls, d: int = 16, n: int = 24, vocab: int = 32, n_layers: int = 3, seed: int = 1,
                strength: float = 4.0, offset: float = 0.0) -> tuple[PlantedLinearModel, Tensor]:
        """Harmful = harmless + strength·r*; the prompts' spread, the writes and every readout but the
        refusal token's live in r*'s complement. Harmful prompts refuse (logit 2·strength against the
        comply bias 4), ablating r* lets them comply, adding DiM makes harmless prompts refuse, and
        ablating any other direction moves the harmless logits (the retain loss). ``offset``: both classes
        also share a mean along a direction off r* (residual streams' common offset, which COSMIC's
        cosines are measured against)."""
        g = torch.Generator().manual_seed(seed)
        r = unit_rows(torch.randn(1, d, generator=g))[0]
        keep = torch.eye(d) - torch.outer(r, r)
        writes = keep @ (0.1 * torch.randn(n_layers, d, d, generator=g)) @ keep
        harmless = torch.randn(n, d, generator=g) @ keep
        harmful = strength * r + torch.randn(n, d, generator=g) @ keep
        if offset:
            shared = unit_rows(torch.randn(1, d, generator=g) @ keep)[0]
            harmless, harmful = harmless + offset * shared, harmful + offset * shared
        readout = 0.5 * torch.randn(vocab, d, generator=g) @ keep
        readout[0] = 2.0 * r
        bias = torch.zeros(vocab)
        bias[1] = 4.0
        return cls(harmful, harmless, readout, bias, writes), r

    def run(self, split: str, *, ablate: Tensor | None = None, add: Tensor | None = None,
            add_layer: int | None = None, read: Sequence[int] = ()) -> Steered:
        x0 = self.inputs[split]
        steer = ablate if ablate is not None else add
        m = 1 if steer is None else steer.shape[0]
        x = x0.expand(m, *x0.shape)
        unit = None if ablate is None else unit_rows(ablate)[:, None, :]

        def project(v: Tensor) -> Tensor:
            return v if unit is None else v - (v * unit).sum(-1, keepdim=True) * unit

        captured = []
        for layer in range(self.n_layers):
            x = project(x)
            if add is not None and layer == add_layer:
                x = x + add[:, None, :]
            x = x + project(x @ self.writes[layer].T)
            if layer in read:
                captured.append(x)
        residuals = torch.stack(captured, dim=2) if captured else x.new_zeros(m, len(x0), 0, self.d_model)
        return Steered(x @ self.readout.T + self.bias, residuals)
