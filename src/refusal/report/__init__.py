"""Reports of a sweep: tables (Markdown, CSV) in :mod:`~refusal.report.tables`, the Pareto front in
:mod:`~refusal.report.pareto`, plots in :mod:`~refusal.report.plots`. ``python -m refusal.report DIR`` writes
them. The names below were ``refusal.report``'s when it was one module; they stay importable from here."""

from __future__ import annotations

from refusal.report.pareto import FRONT, dominates, mark_front, pareto_front
from refusal.report.tables import (
    COLUMNS,
    HOLM_KEY,
    PAIRED_NOTE,
    Report,
    columns_for,
    flat_row,
    format_run,
    front_table,
    load_runs,
    main,
    mark_holm,
    markdown_table,
    write_report,
)

__all__ = ["COLUMNS", "FRONT", "HOLM_KEY", "PAIRED_NOTE", "Report", "columns_for", "dominates", "flat_row", "format_run",
           "front_table", "load_runs", "main", "mark_front", "mark_holm", "markdown_table", "pareto_front", "write_report"]
