"""Perplexity of target tokens, used to check that steering does not wreck fluency."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torchmetrics import Metric

# Upcast at most this many logits to float32 at once, so a 256k vocabulary over a long
# completion does not need a second full-size copy of the logits.
_CHUNK_ELEMENTS = 1 << 24


def token_nll(logits: Float[Tensor, "*positions vocab"], target: Int[Tensor, "*positions"],
              ignore_index: int = -100) -> Float[Tensor, "*positions"]:
    """Negative log-likelihood of each target token (float64; 0 where ``target == ignore_index``), the
    logits upcast a chunk at a time. Per-prompt sums of it are what paired perplexity comparisons resample."""
    if logits.ndim < 2 or logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits must be [..., vocab] with target of shape logits.shape[:-1]; "
            f"got logits {tuple(logits.shape)}, target {tuple(target.shape)}"
        )
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_target = target.reshape(-1).long()
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    nll = torch.zeros(flat_target.shape, dtype=torch.float64, device=logits.device)
    for start in range(0, len(flat_target), rows):
        lg, tg = flat_logits[start:start + rows], flat_target[start:start + rows]
        if (tg != ignore_index).any():
            nll[start:start + rows] = F.cross_entropy(lg.float(), tg, ignore_index=ignore_index, reduction="none").double()
    return nll.reshape(target.shape)


class Perplexity(Metric):
    """exp(mean token negative log-likelihood) over all non-ignored target tokens.

    ``update(logits, target)`` takes logits ``[batch, seq, vocab]`` and target ``[batch, seq]``
    that are **already aligned**: ``logits[:, i]`` is the prediction for ``target[:, i]`` (the
    caller does the usual shift, ``logits[:, :-1]`` vs ``input_ids[:, 1:]``). Positions where
    ``target == ignore_index`` (padding, prompt tokens) contribute nothing, whatever their
    logits. ``compute()`` is nan if no token was counted.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 1.0

    total_nll: Tensor
    count: Tensor

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.add_state("total_nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Accumulate the summed NLL and the number of counted tokens of one batch."""
        nll = token_nll(logits, target, self.ignore_index)
        self.total_nll += nll.sum().to(self.total_nll.device)
        self.count += int((target != self.ignore_index).sum())

    def compute(self) -> Tensor:
        """Perplexity (float32); nan if no token was counted."""
        if self.count == 0:
            return torch.tensor(float("nan"))
        return torch.exp(self.total_nll / self.count).float()
