"""``python -m refusal judges --validate --quality``: the StrongREJECT quality score checked against human labels.

The quality score (:mod:`refusal.judges.quality`) claims two things about a completion of a harmful prompt: whether
it is a refusal (item 1: the primary refusal judge's label, or the judge model's ``P(refused)``), and how real an
answer it is. A labelled file says both as a person read
them: ``label`` (refusal, partial refusal or compliance) and ``answers_prompt`` (whether it answers *this*
prompt). Each claim is scored as a ranking, by the area under the ROC curve (the chance that a random positive
row outranks a random negative one, ties half) with Hanley and McNeil's interval: item 1 against the
refusals (partial ones included), and the score against the real answers (compliance that answers the prompt).
Rows of harmless prompts are left out when the file names their column (the rubric is for forbidden prompts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from refusal.artifacts import shown_path
from refusal.errors import DataError
from refusal.judges import build_judges, judge_configs
from refusal.judges.labelled import read_labelled
from refusal.judges.quality import QualityScorer
from refusal.judges.validate import compose_overrides, rows_of_split
from refusal.paths import PLUGINS_DIR


def auc(scores: Sequence[float], positive: Sequence[bool]) -> dict[str, float]:
    """Area under the ROC curve of ``scores`` for ``positive`` rows (Mann–Whitney; ties count half) with
    Hanley & McNeil's (1982) 95% interval, clipped to [0, 1]."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        raise DataError(f"an AUC needs rows of both kinds ({len(pos)} positive, {len(neg)} negative); label more rows")
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    value = wins / (len(pos) * len(neg))
    q1, q2 = value / (2 - value), 2 * value * value / (1 + value)
    var = (value * (1 - value) + (len(pos) - 1) * (q1 - value * value) + (len(neg) - 1) * (q2 - value * value)) / (
        len(pos) * len(neg))
    half = 1.96 * math.sqrt(max(var, 0.0))
    return {"value": value, "low": max(0.0, value - half), "high": min(1.0, value + half), "positive": len(pos),
            "negative": len(neg)}


def harmless_columns(cfg: Any) -> set[str]:
    """The columns whose prompts are harmless in this configuration: the split's own and every harmless test set."""
    sets = OmegaConf.to_container(cfg.eval.get("test_sets") or {}, resolve=True)
    return {"harmless"} | {name for name, spec in sets.items() if spec and spec.get("label") == "harmless"}


def validate_quality(path: str | Path, overrides: Sequence[str] = (), split: str | None = None) -> dict[str, Any]:
    """The quality judge (``eval.quality_judge``) on a labelled file's harmful-prompt rows (``split``: dev or test
    rows only): AUC of item 1 for the refusals (and of the judge model's own P(refused)), AUC of the score for the
    real answers, the mean score of each kind of row, and every row's reading with the judge's reasoning line."""
    cfg = compose_overrides(overrides)
    QualityScorer.check(cfg.eval.quality_judge)
    harmless = harmless_columns(cfg)
    rows = read_labelled(path)
    rows = [r for r in (rows_of_split(rows, split, path) if split else rows) if r.column not in harmless]
    if not rows:
        raise DataError(f"{path} has no rows of harmful prompts (columns {sorted(harmless)} are harmless)")
    judge = OmegaConf.to_container(cfg.eval.quality_judge, resolve=True)
    prompts, completions = [r.prompt for r in rows], [r.completion for r in rows]
    scorer = QualityScorer(judge, cfg.cache_dir)
    judge.update(reasoning_tokens=scorer.reasoning_tokens, refused=scorer.refused_from)  # what ran, defaults filled in
    read = rubric = scorer.score(prompts, completions)
    if scorer.refused_from == "judge":  # item 1 from the primary refusal judge, as in evaluate.py
        name, primary = next(iter(build_judges(judge_configs(cfg, [PLUGINS_DIR]), [PLUGINS_DIR], cfg.cache_dir).items()))
        judge["refused_by"] = name
        read = [q.refused_as(j.label) for q, j in zip(read, primary.judge(prompts, completions), strict=True)]
    refused = [r.label != "compliance" for r in rows]
    real = [r.label == "compliance" and r.answers_prompt is True for r in rows]
    kinds = {"refusal (incl. partial)": refused,
             "compliance, not answering the prompt": [not a and not b for a, b in zip(refused, real, strict=True)],
             "compliance answering the prompt": real}
    means = {kind: {"n": sum(mask), "quality": sum(q.score for q, m in zip(read, mask, strict=True) if m) / max(1, sum(mask)),
                    "refused": sum(q.refused for q, m in zip(read, mask, strict=True) if m) / max(1, sum(mask))}
             for kind, mask in kinds.items()}
    return {"file": shown_path(path), "split": split or "all", "n": len(rows), "left_out_columns": sorted(harmless),
            "judge": judge,
            "refused_auc": auc([q.refused for q in read], refused),
            "rubric_refused_auc": auc([q.refused for q in rubric], refused),  # the judge model's own item-1 digit
            "quality_auc": auc([q.score for q in read], real),
            "means": means,
            "rows": [{"line": r.line, "label": r.label, "answers_prompt": r.answers_prompt, "refused": q.refused,
                      "rubric_p_refused": g.refused, "convincing": q.convincing, "specific": q.specific,
                      "quality": q.score, "reasoning": q.reasoning} for r, q, g in zip(rows, read, rubric, strict=True)]}


def format_quality(out: dict[str, Any]) -> str:
    """The check as a few readable lines."""
    a, b, g = out["refused_auc"], out["quality_auc"], out["rubric_refused_auc"]
    item1 = f"the {out['judge']['refused_by']} judge's label" if "refused_by" in out["judge"] else "P(refused)"
    lines = [f"{out['file']} ({out['split']} rows): {out['n']} of harmful prompts (left out: "
             f"{', '.join(out['left_out_columns'])}); "
             f"quality judge {out['judge']}",
             f"  item 1 ({item1}) ranks refusals above the rest: AUC {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] "
             f"({a['positive']} vs {a['negative']} rows)",
             f"  (the judge model's own P(refused) instead:            AUC {g['value']:.3f} [{g['low']:.3f}, {g['high']:.3f}])",
             f"  the score ranks real answers above the rest:     AUC {b['value']:.3f} [{b['low']:.3f}, {b['high']:.3f}] "
             f"({b['positive']} vs {b['negative']} rows)"]
    for kind, m in out["means"].items():
        lines.append(f"  {kind:<38} n {m['n']:>4}  mean quality {m['quality']:.3f}  mean refused {m['refused']:.3f}")
    return "\n".join(lines)
