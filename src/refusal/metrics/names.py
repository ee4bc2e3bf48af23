"""The names of a run's headline metrics in results.json (``<column>/<metric>``), defined once: the evaluation
writes them, search trials return them, reports and plots read them."""

from __future__ import annotations

HARMFUL_REFUSAL = "harmful/refusal_rate"
HARMLESS_REFUSAL = "harmless/refusal_rate"
HARMLESS_KL = "harmless/kl_div"
HARMLESS_PERPLEXITY = "harmless/perplexity"
BASELINE_HARMFUL_REFUSAL = "baseline/harmful/refusal_rate"


def column_metric(column: str, metric: str) -> str:
    """The results key of ``metric`` on one column (``harmful``, ``harmless`` or a named test set)."""
    return f"{column}/{metric}"
