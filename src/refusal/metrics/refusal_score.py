"""Logit-based refusal score: log-odds of starting the answer with a refusal token.

Arditi et al. (2024) select and validate the refusal direction with this score rather than with
generated text: it needs one forward pass, not a generation, and it is continuous.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from torchmetrics import Metric


def _as_id_tensor(refusal_token_ids: Sequence[int] | Tensor) -> Tensor:
    ids = torch.as_tensor(refusal_token_ids).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("refusal_token_ids is empty: pass the ids of e.g. 'I' / 'Sorry' / 'As'")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise TypeError(f"refusal_token_ids must be integers, got dtype {ids.dtype}")
    # Duplicates would count a token's probability twice if we gathered; p is over the *set*.
    return torch.unique(ids.long())


#: Arditi et al.'s ε: each prompt's log-odds is bounded by ±log(1/ε) ≈ ±18.42.
EPSILON = 1e-8


def refusal_score(first_logits: Float[Tensor, "batch vocab"], refusal_token_ids: Sequence[int] | Tensor,
                  epsilon: float = EPSILON) -> Float[Tensor, " batch"]:
    """Per-row log(p + ε) − log(1 − p + ε), p = softmax probability mass on ``refusal_token_ids``.

    ``first_logits`` is ``[batch, vocab]``: the logits predicting the first generated token. This is
    refusal_direction's ``refusal_score`` exactly (float64 softmax, 1 − p by subtraction, ε = 1e-8),
    so a direction is selected on the same numbers as theirs; ε bounds a confident prompt's score near
    ±18.4 instead of letting one prompt dominate a mean. The result is float64.
    """
    if first_logits.ndim != 2:
        raise ValueError(f"first_logits must be [batch, vocab], got shape {tuple(first_logits.shape)}")
    vocab = first_logits.shape[-1]
    ids = _as_id_tensor(refusal_token_ids).to(first_logits.device)
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"refusal_token_ids must lie in [0, {vocab}), got {ids.tolist()}")
    if ids.numel() == vocab:
        raise ValueError(
            "refusal_token_ids covers the whole vocabulary: 1 - p is 0, the log-odds is undefined"
        )
    probs = torch.softmax(first_logits.to(torch.float64), dim=-1)
    refusal = probs[:, ids].sum(dim=-1)
    return torch.log(refusal + epsilon) - torch.log(torch.ones_like(refusal) - refusal + epsilon)


class RefusalScore(Metric):
    """Mean :func:`refusal_score` over all rows seen."""

    # Whether a higher score is better depends on the prompts (harmful: yes, harmless: no).
    higher_is_better: bool | None = None
    is_differentiable = False
    full_state_update = False

    score_sum: Tensor
    count: Tensor
    refusal_token_ids: Tensor

    def __init__(self, refusal_token_ids: Sequence[int] | Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # A non-persistent buffer follows the metric across .to(device) but stays out of state_dict.
        self.register_buffer("refusal_token_ids", _as_id_tensor(refusal_token_ids), persistent=False)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, first_logits: Tensor) -> None:
        """Add the scores of a ``[batch, vocab]`` batch of first-position logits."""
        scores = refusal_score(first_logits, self.refusal_token_ids)
        self.score_sum += scores.double().sum().to(self.score_sum.device)
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """Mean log-odds (float32); nan if nothing was seen."""
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.score_sum / self.count).float()
