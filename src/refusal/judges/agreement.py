"""Agreement between two judges on the same completions: Cohen's κ and the confusion matrix
(torchmetrics, over the three labels refusal / compliance / unclear)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.classification import MulticlassCohenKappa, MulticlassConfusionMatrix

from refusal.judges.base import LABELS


def agreement(first: Sequence[str], second: Sequence[str]) -> dict[str, Any]:
    """κ, raw agreement and the confusion matrix (rows: ``first``'s labels, columns: ``second``'s)."""
    if len(first) != len(second):
        raise ValueError(f"the judges labelled {len(first)} and {len(second)} completions")
    a = torch.tensor([LABELS.index(x) for x in first], dtype=torch.long)
    b = torch.tensor([LABELS.index(x) for x in second], dtype=torch.long)
    confusion = MulticlassConfusionMatrix(num_classes=len(LABELS))(b, a)  # torchmetrics: rows = target = first
    if len(a) == 0:
        kappa = float("nan")
    elif torch.equal(a, b):
        kappa = 1.0  # perfect agreement; torchmetrics gives nan when both judges use one label only
    else:
        kappa = float(MulticlassCohenKappa(num_classes=len(LABELS))(b, a))
    return {"kappa": kappa, "agreement": float((a == b).float().mean()) if len(a) else float("nan"),
            "n": len(a), "labels": list(LABELS), "confusion": confusion.tolist()}
