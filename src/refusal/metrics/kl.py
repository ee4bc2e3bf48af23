"""KL divergence between the unsteered and the steered next-token distributions.

Measures how much an intervention changes the model beyond refusal: on harmless prompts a good
refusal ablation should leave the distribution almost untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from torchmetrics import Metric

# Upcast at most this many logits (per input) to float32 at once; see perplexity.py.
_CHUNK_ELEMENTS = 1 << 24


def _kl_rows(base: Tensor, steered: Tensor) -> Tensor:
    """KL(P_base || P_steered) for each row of two ``[n, vocab]`` logit tensors, in float32."""
    log_p = torch.log_softmax(base.float(), dim=-1)
    log_q = torch.log_softmax(steered.float(), dim=-1)
    p = log_p.exp()
    # p == 0 terms are 0 by convention; without the where, -inf base logits would give 0 * -inf = nan.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=p.dtype, device=p.device))
    # True KL is >= 0; clamp the float rounding of near-identical distributions.
    return terms.sum(dim=-1).clamp_min(0.0)


def kl_per_position(base_logits: Float[Tensor, "*positions vocab"],
                    steered_logits: Float[Tensor, "*positions vocab"]) -> Float[Tensor, "*positions"]:
    """KL(P_base || P_steered) at every position (float64), a chunk of rows at a time: the per-prompt
    values that paired KL comparisons resample, and what :class:`KLDivergence` sums."""
    if base_logits.shape != steered_logits.shape or base_logits.ndim < 2:
        raise ValueError(
            f"base_logits and steered_logits must share a [..., vocab] shape; "
            f"got {tuple(base_logits.shape)} and {tuple(steered_logits.shape)}"
        )
    vocab = base_logits.shape[-1]
    base, steered = base_logits.reshape(-1, vocab), steered_logits.reshape(-1, vocab)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    kl = [_kl_rows(b, s).double() for b, s in zip(base.split(rows), steered.split(rows), strict=True)]
    out = torch.cat(kl) if kl else torch.zeros(0, dtype=torch.float64, device=base.device)
    return out.reshape(base_logits.shape[:-1])


class KLDivergence(Metric):
    """Mean per-position KL(P_base || P_steered) over all (masked-in) positions.

    ``update(base_logits, steered_logits, mask=None)`` takes logits ``[..., vocab]`` — ``[batch,
    vocab]`` for the last prompt position, ``[batch, seq, vocab]`` over a completion — and an
    optional ``mask`` of shape ``logits.shape[:-1]`` (True / 1 = count this position). Masked-out
    positions are dropped before any arithmetic, so padding may hold anything. ``compute()`` is
    nan if no position was counted.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0

    total_kl: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total_kl", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, base_logits: Tensor, steered_logits: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate the summed per-position KL and the number of positions of one batch."""
        if base_logits.shape != steered_logits.shape or base_logits.ndim < 2:
            raise ValueError(
                f"base_logits and steered_logits must share a [..., vocab] shape; "
                f"got {tuple(base_logits.shape)} and {tuple(steered_logits.shape)}"
            )
        vocab = base_logits.shape[-1]
        base = base_logits.reshape(-1, vocab)
        steered = steered_logits.reshape(-1, vocab)
        if mask is not None:
            if mask.shape != base_logits.shape[:-1]:
                raise ValueError(
                    f"mask must have shape {tuple(base_logits.shape[:-1])}, got {tuple(mask.shape)}"
                )
            keep = mask.reshape(-1).to(device=base.device, dtype=torch.bool)
            base, steered = base[keep], steered[keep]
        kl = kl_per_position(base, steered).sum()
        self.total_kl += kl.to(self.total_kl.device)
        self.count += base.shape[0]

    def compute(self) -> Tensor:
        """Mean KL per position in nats (float32); nan if no position was counted."""
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total_kl / self.count).float()
