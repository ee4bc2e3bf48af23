"""Paired comparison of two runs on the same prompts, from what each run saved (completions.jsonl).

    python -m refusal.compare outputs/flip outputs/ablation      # flip relative to ablation

Every run records, per prompt, the primary judge's verdict on its steered and on the unsteered
completion and (harmless prompts, full evaluations) the steered and unsteered NLL of the unsteered
completion and the KL; :func:`compare` turns two such records into paired differences
(:mod:`refusal.stats.paired`), and refuses runs whose prompts differ.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refusal.errors import DataError
from refusal.run_files import COMPLETIONS, completions_path, read_completions
from refusal.stats.paired import (
    check_same_prompts,
    paired_mean_difference,
    paired_rate_difference,
    prompts_digest,
)

#: The per-prompt teacher-forced values a paired perplexity / KL comparison needs.
TEACHER_FORCED = {"nll", "tokens", "kl_div"}


@dataclass
class RunOutcomes:
    """One run's per-prompt outcomes, column by column (``harmful``, ``harmless``, test sets)."""

    digests: dict[str, str]  # column -> digest of its prompts in order
    refused: dict[str, np.ndarray]  # column -> primary judge's verdict per steered completion
    baseline_refused: dict[str, np.ndarray] = field(default_factory=dict)  # ... per unsteered completion
    teacher_forced: dict[str, np.ndarray] = field(default_factory=dict)  # nll, tokens, kl_div, baseline_nll (harmless)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> RunOutcomes:
        by_column: dict[str, list[Mapping[str, Any]]] = {}
        for row in rows:
            by_column.setdefault(row["split"], []).append(row)
        out = cls({c: prompts_digest([r["prompt"] for r in rs]) for c, rs in by_column.items()},
                  {c: np.array([bool(r["refused"]) for r in rs]) for c, rs in by_column.items()})
        for column, rs in by_column.items():
            if all("baseline_refused" in r for r in rs):
                out.baseline_refused[column] = np.array([bool(r["baseline_refused"]) for r in rs])
        harmless = by_column.get("harmless", [])
        for key in ("nll", "tokens", "kl_div", "baseline_nll"):
            if harmless and all(key in r for r in harmless):
                out.teacher_forced[key] = np.array([float(r[key]) for r in harmless])
        if harmless and all("baseline_completion" in r for r in harmless):  # the text perplexity was measured on
            out.teacher_forced["baseline_completion"] = np.array([r["baseline_completion"] for r in harmless], dtype=object)
        return out

    @classmethod
    def from_dir(cls, run_dir: str | Path) -> RunOutcomes:
        if completions_path(run_dir) is None:
            raise DataError(f"{Path(run_dir) / COMPLETIONS} not found: paired comparisons read each run's completions.jsonl "
                            "(or its archived .gz); point at a run folder written by evaluate.py")
        return cls.from_rows(read_completions(run_dir))

    def baseline(self) -> RunOutcomes:
        """The unsteered model on the same prompts, as this run recorded it (what a ``none`` run would record)."""
        tf = self.teacher_forced
        forced = {} if "baseline_nll" not in tf else {"nll": tf["baseline_nll"], "tokens": tf["tokens"],
                                                     "kl_div": np.zeros_like(tf["baseline_nll"])}
        return RunOutcomes(dict(self.digests), dict(self.baseline_refused), {}, forced)


def refusal_vs(a: np.ndarray, b: np.ndarray, column: str, name: str) -> dict[str, Any]:
    """``<column>/refusal_rate_vs_<name>`` (rate a − rate b, with ``_ci95``) and ``<column>/mcnemar_p_vs_<name>``."""
    d = paired_rate_difference(a, b)
    return {f"{column}/refusal_rate_vs_{name}": d.estimate, f"{column}/refusal_rate_vs_{name}_ci95": [d.lo, d.hi],
            f"{column}/mcnemar_p_vs_{name}": d.p_value}


def log_perplexity(tf: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-prompt mean NLL per token (0 for an empty completion, which gets weight 0)."""
    return np.divide(tf["nll"], tf["tokens"], out=np.zeros_like(tf["nll"], dtype=np.float64), where=tf["tokens"] > 0)


def teacher_forced_vs(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], name: str,
                      confidence: float = 0.95) -> dict[str, Any]:
    """Harmless perplexity ratio a/b (a per-token weighted difference of log-perplexity, exponentiated) and
    next-token KL difference a − b, each with its paired bootstrap interval."""
    if not (TEACHER_FORCED <= set(a) and TEACHER_FORCED <= set(b)):
        raise DataError(f"a run compared with {name} has no per-prompt perplexity in its completions.jsonl (made before "
                        "it was recorded, or a lean search trial): rerun it with evaluate.py")
    if not np.array_equal(a["tokens"], b["tokens"]):
        raise DataError(f"the runs scored different harmless completions (token counts differ) against {name}: "
                        "perplexity is paired only on the same unsteered completions; use the same eval.max_new_tokens")
    log_ratio = paired_mean_difference(log_perplexity(a), log_perplexity(b), weights=a["tokens"], confidence=confidence)
    kl = paired_mean_difference(a["kl_div"], b["kl_div"], confidence=confidence)
    return {f"harmless/perplexity_ratio_vs_{name}": math.exp(log_ratio.estimate),
            f"harmless/perplexity_ratio_vs_{name}_ci95": [math.exp(log_ratio.lo), math.exp(log_ratio.hi)],
            f"harmless/kl_div_vs_{name}": kl.estimate, f"harmless/kl_div_vs_{name}_ci95": [kl.lo, kl.hi]}


def on_common_text(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Both runs' per-prompt teacher-forced values cut to the prompts whose unsteered completion is the same text in
    both, and how many those are. Greedy decoding in bfloat16 products is not exactly batch-invariant, so two runs
    that generated their unsteered baselines in different batch mixes (other test sets beside) can disagree on a few
    prompts; perplexity is paired only where both scored the same text. Runs that did not record the text keep every
    prompt (:func:`teacher_forced_vs` then refuses token counts that differ)."""
    if "baseline_completion" not in a or "baseline_completion" not in b:  # no texts to compare: all prompts, and
        return dict(a), dict(b), len(a.get("tokens", ()))                   # teacher_forced_vs checks token counts
    same = a["baseline_completion"] == b["baseline_completion"]
    return {k: v[same] for k, v in a.items()}, {k: v[same] for k, v in b.items()}, int(same.sum())


def compare(a: RunOutcomes, b: RunOutcomes, name: str = "b") -> dict[str, Any]:
    """Paired metrics of run ``a`` relative to run ``b`` on every column both have (keys end in ``_vs_<name>``).
    A column whose prompts differ between the runs is refused (:class:`DataError`), never skipped."""
    common = [c for c in a.refused if c in b.refused]
    if not common:
        raise DataError(f"the runs share no column of prompts (a: {sorted(a.refused)}, b: {sorted(b.refused)}): "
                        "paired statistics need the same prompts")
    out: dict[str, Any] = {}
    for column in common:
        check_same_prompts(a.digests[column], b.digests[column], f"the two runs' {column} prompts")
        out.update(refusal_vs(a.refused[column], b.refused[column], column, name))
    if TEACHER_FORCED <= set(a.teacher_forced) and TEACHER_FORCED <= set(b.teacher_forced):
        out.update(teacher_forced_vs(a.teacher_forced, b.teacher_forced, name))
    return out


def vs_baseline(outcomes: RunOutcomes) -> dict[str, Any]:
    """A run against its own unsteered completions on the same prompts (``_vs_baseline`` keys), and its
    next-token KL's interval (``harmless/kl_div_ci95``; the baseline's KL is 0 by definition)."""
    out = compare(outcomes, outcomes.baseline(), "baseline") if outcomes.baseline_refused else {}
    if "harmless/kl_div_vs_baseline" in out:
        out.pop("harmless/kl_div_vs_baseline")
        out["harmless/kl_div_ci95"] = out.pop("harmless/kl_div_vs_baseline_ci95")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="a run folder (its completions.jsonl)")
    parser.add_argument("b", type=Path, help="the run to compare it with, on the same prompts")
    args = parser.parse_args(argv)
    found = compare(RunOutcomes.from_dir(args.a), RunOutcomes.from_dir(args.b), name=args.b.name)
    for key, value in found.items():
        if not key.endswith("_ci95"):
            ci = found.get(f"{key}_ci95")
            print(f"{key}: {value:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
