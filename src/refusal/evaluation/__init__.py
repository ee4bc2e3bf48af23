"""Evaluation of one run, split by job: :mod:`~refusal.evaluation.judging` (generate and judge every column),
:mod:`~refusal.evaluation.scoring` (teacher-forced perplexity and KL), :mod:`~refusal.evaluation.records`
(results.json and completions.jsonl), :mod:`~refusal.evaluation.run` (a full run, ``evaluate.py``'s body),
:mod:`~refusal.evaluation.trial` (a lean search trial) and :mod:`~refusal.evaluation.search` (checks of an
Optuna search before its first trial).

The names below were ``refusal.evaluation``'s when it was one module; they stay importable from here.
"""

from __future__ import annotations

from refusal.evaluation.judging import Columns, Judged, generate_and_judge
from refusal.evaluation.records import (
    add_constraints,
    add_paired,
    completion_rows,
    measure_capability,
    run_record,
    versions,
    warn_if_barely_refuses,
    write_outputs,
)
from refusal.evaluation.run import evaluate_context, run_evaluation
from refusal.evaluation.scoring import (
    HELD_LOGITS_BYTES,
    SCORING_LOGITS_BYTES,
    cached_scores,
    teacher_forced_scores,
)

__all__ = [
    "HELD_LOGITS_BYTES", "SCORING_LOGITS_BYTES", "Columns", "Judged", "add_constraints", "add_paired", "cached_scores", "completion_rows",
    "evaluate_context", "generate_and_judge", "measure_capability", "run_evaluation", "run_record", "teacher_forced_scores", "versions",
    "warn_if_barely_refuses", "write_outputs",
]
