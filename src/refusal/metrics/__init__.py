"""Evaluation metrics, each a ``torchmetrics.Metric`` with sum-reduced states.

Sum-reduced states make every metric mergeable (``merge_state``) and DDP-syncable, so per-batch,
per-shard and per-process results combine into exactly the number one pass would give.
"""

from __future__ import annotations

from refusal.metrics.kl import KLDivergence
from refusal.metrics.perplexity import Perplexity
from refusal.metrics.refusal_rate import (
    REFUSAL_PHRASES,
    JudgedRefusalRate,
    RefusalRate,
    is_refusal,
    normalize_text,
    wilson_interval,
)
from refusal.metrics.refusal_score import RefusalScore, refusal_score

__all__ = [
    "REFUSAL_PHRASES",
    "JudgedRefusalRate",
    "KLDivergence",
    "Perplexity",
    "RefusalRate",
    "RefusalScore",
    "is_refusal",
    "normalize_text",
    "refusal_score",
    "wilson_interval",
]
