"""How well a judge matches human labels: accuracy, precision, recall and Cohen's κ with 95% intervals.

The metrics are binary, refusal being the positive class: a gold ``partial_refusal`` counts as refusal
(the model declined at least part of the request, which is what a refusal rate should see), and a judge's
``unclear`` counts as not refusal, as it does in the judge's own refusal rate. The full confusion matrix
(gold refusal / partial_refusal / compliance against judge refusal / compliance / unclear) is kept too.

Intervals: Wilson score intervals for the proportions; for κ the large-sample standard error of Fleiss,
Cohen & Everitt (1969, Psychol. Bull. 72:323), κ ± 1.96·SE clipped to [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from refusal.judges.base import LABELS
from refusal.judges.labelled import GOLD_LABELS
from refusal.metrics.refusal_rate import wilson_interval

Z95 = 1.96  # as wilson_interval


def kappa_with_se(table: Sequence[Sequence[int]]) -> tuple[float, float]:
    """Cohen's κ of a square count table (rows: one rater, columns: the other) and its large-sample SE.

    SE² = [Σ_i p_ii (1 − (p_i. + p_.i)(1 − κ))² + (1 − κ)² Σ_{i≠j} p_ij (p_.i + p_j.)² − (κ − p_e(1 − κ))²]
          / (n (1 − p_e)²)        (Fleiss, Cohen & Everitt 1969). Both are nan when p_e = 1 (one label only).
    """
    counts = torch.tensor(table, dtype=torch.float64)
    n = float(counts.sum())
    if n == 0:
        return math.nan, math.nan
    p = counts / n
    rows, cols = p.sum(1), p.sum(0)
    p_o, p_e = float(p.trace()), float(rows @ cols)
    if p_e >= 1 - 1e-12:
        return math.nan, math.nan
    kappa = (p_o - p_e) / (1 - p_e)
    diag = torch.diagonal(p)
    term_a = float((diag * (1 - (rows + cols) * (1 - kappa)) ** 2).sum())
    off = p * (cols[:, None] + rows[None, :]) ** 2  # p_ij (p_.i + p_j.)²
    term_b = (1 - kappa) ** 2 * float(off.sum() - torch.diagonal(off).sum())
    term_c = (kappa - p_e * (1 - kappa)) ** 2
    return kappa, math.sqrt(max(term_a + term_b - term_c, 0.0) / (n * (1 - p_e) ** 2))


def _share(hits: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(hits, n)
    return {"value": hits / n if n else math.nan, "low": low, "high": high, "hits": hits, "n": n}


def judge_accuracy(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, Any]:
    """Binary metrics with 95% intervals and the 3×3 confusion matrix of one judge against gold labels."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} judgements")
    g = torch.tensor([GOLD_LABELS.index(x) for x in gold], dtype=torch.long)
    j = torch.tensor([LABELS.index(x) for x in predicted], dtype=torch.long)
    confusion = torch.bincount(g * len(LABELS) + j, minlength=len(GOLD_LABELS) * len(LABELS)).view(len(GOLD_LABELS), -1)
    truth = g != GOLD_LABELS.index("compliance")
    said = j == LABELS.index("refusal")
    tp, fp = int((truth & said).sum()), int((~truth & said).sum())
    fn, tn = int((truth & ~said).sum()), int((~truth & ~said).sum())
    kappa, se = kappa_with_se([[tp, fn], [fp, tn]])
    return {
        "n": len(gold),
        "accuracy": _share(tp + tn, len(gold)),
        "precision": _share(tp, tp + fp),
        "recall": _share(tp, tp + fn),
        "kappa": {"value": kappa, "se": se, "low": max(-1.0, kappa - Z95 * se), "high": min(1.0, kappa + Z95 * se)},
        "binary": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "unclear": int((j == LABELS.index("unclear")).sum()),
        "confusion": {"rows": list(GOLD_LABELS), "columns": list(LABELS), "counts": confusion.tolist()},
    }


def format_report(name: str, result: dict[str, Any]) -> str:
    """One judge's block of the ``--validate`` printout."""
    lines = [f"judge {name}  (n = {result['n']}, unclear = {result['unclear']})"]
    for metric in ("accuracy", "precision", "recall"):
        m = result[metric]
        lines.append(f"  {metric:<10} {m['value']:.3f}  [{m['low']:.3f}, {m['high']:.3f}]  ({m['hits']}/{m['n']}, Wilson 95%)")
    k = result["kappa"]
    lines.append(f"  {'kappa':<10} {k['value']:.3f}  [{k['low']:.3f}, {k['high']:.3f}]  (SE {k['se']:.3f}, "
                 "Fleiss-Cohen-Everitt 95%)")
    conf = result["confusion"]
    width = max(map(len, conf["rows"])) + 2
    lines.append("  confusion (rows: gold label, columns: judge label)")
    lines.append("  " + " " * width + "".join(f"{c:>12}" for c in conf["columns"]))
    for label, counts in zip(conf["rows"], conf["counts"], strict=True):
        lines.append(f"  {label:<{width}}" + "".join(f"{c:>12}" for c in counts))
    return "\n".join(lines)
