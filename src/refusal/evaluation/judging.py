"""Generate every column of a run (baseline and steered, cached) and judge it: what a full evaluation and a
search trial share."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusal.config import plugin_dirs
from refusal.context import RunContext
from refusal.interventions import Intervention
from refusal.judges import Judge, Judgement, agreement, build_judges
from refusal.metrics import JudgedRefusalRate, RefusalScore, wilson_interval
from refusal.runtime.generation import GenerationCache, Generations, truncated


def _column_metrics(column: str, judged: dict[str, list[Judgement]], primary: str,
                    primary_base: list[str]) -> dict[str, Any]:
    """Refusal rates of one column: the primary judge's under the plain keys (``harmful/refusal_rate``),
    every judge's under ``harmful/judge/<name>/...`` when several ran, and the primary baseline."""
    out: dict[str, Any] = {}
    for name, verdicts in judged.items():
        metric = JudgedRefusalRate()
        metric.update([v.label for v in verdicts])
        rate, refused, unclear, n = float(metric.compute()), int(metric.refused), int(metric.unclear), int(metric.total)
        keys = [f"{column}/judge/{name}/"] if len(judged) > 1 else []
        if name == primary:
            keys.append(f"{column}/")
        for prefix in keys:
            out[f"{prefix}refusal_rate"] = rate
            out[f"{prefix}refusal_rate_ci95"] = list(wilson_interval(refused, n))
            out[f"{prefix}unclear"] = unclear
    base = JudgedRefusalRate()
    base.update(primary_base)
    out[f"baseline/{column}/refusal_rate"] = float(base.compute())
    return out


def _agreements(labels: dict[str, dict[str, list[Judgement]]]) -> dict[str, dict[str, Any]]:
    """Cohen's κ and the confusion matrix for every pair of judges, over all steered completions."""
    flat = {name: [j.label for column in cols.values() for j in column] for name, cols in labels.items()}
    return {f"{a}~{b}": agreement(flat[a], flat[b]) for a, b in itertools.combinations(flat, 2)}


def _score(first_logits: torch.Tensor, token_ids: list[int]) -> float:
    metric = RefusalScore(token_ids)
    metric.update(first_logits)
    return float(metric.compute())


Columns = list[tuple[str, str, str]]  # (metric prefix, split or test-set name, label)


def _generate_columns(ctx: RunContext, intervention: Intervention, steer: str | None, columns: Columns,
                      judged_tokens: int, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Generations], dict[str, Generations]]:
    """Baseline and steered generations of every column, from the cache when they were made before, each cut to
    its first ``judged_tokens`` (generated longer when ``gen_kwargs`` asks for more)."""
    cache = GenerationCache(Path(ctx.cfg.cache_dir) / "generations")
    sets = {col: ctx.tokens(split) for col, split, _ in columns}

    def cut(gens: dict[str, Generations]) -> dict[str, Generations]:
        if gen_kwargs["max_new_tokens"] == judged_tokens:
            return gens
        return {col: truncated(g, judged_tokens, ctx.bundle.tokenizer) for col, g in gens.items()}

    base = cut(cache.get_many(ctx.bundle, sets, desc="baseline", **gen_kwargs))
    if steer is None:
        return base, base
    with intervention.apply(ctx.bundle):
        steered = cut(cache.get_many(ctx.bundle, sets, steer=steer, desc=intervention.name, **gen_kwargs))
    return base, steered


def _judge_columns(ctx: RunContext, judges: dict[str, Judge], columns: Columns, base: dict[str, Generations],
                   steered: dict[str, Generations], metrics: dict[str, Any],
                   max_new: int) -> tuple[dict[str, dict[str, list[Judgement]]], dict[str, list[str]]]:
    """Every judge on every column's steered completions (the primary one also on the baseline's); adds the
    column metrics to ``metrics`` and returns judge -> column -> judgements and column -> the primary
    judge's baseline labels."""
    primary = next(iter(judges))
    labels: dict[str, dict[str, list[Judgement]]] = {name: {} for name in judges}
    base_labels: dict[str, list[str]] = {}
    for column, split, _ in columns:
        prompts = ctx.texts(split)
        for name, judge in judges.items():
            labels[name][column] = judge.judge(prompts, steered[column].completions)
        primary_base = base_labels[column] = [j.label for j in judges[primary].judge(prompts, base[column].completions)]
        metrics.update(_column_metrics(column, {n: labels[n][column] for n in judges}, primary, primary_base))
        metrics[f"{column}/refusal_score"] = _score(steered[column].first_logits, ctx.bundle.refusal_token_ids)
        metrics[f"{column}/hit_token_limit"] = sum(len(ids) >= max_new for ids in steered[column].completion_ids)
        if column not in ("harmful", "harmless"):
            metrics[f"{column}/n"] = len(prompts)
    return labels, base_labels


@dataclass
class Judged:
    """Baseline and steered generations of every column, and what every judge said about them."""

    columns: Columns
    base: dict[str, Generations]
    steered: dict[str, Generations]
    judges: dict[str, Judge]
    labels: dict[str, dict[str, list[Judgement]]]  # judge -> column -> one judgement per prompt
    base_labels: dict[str, list[str]]  # column -> the primary judge's label of each unsteered completion
    metrics: dict[str, Any]
    agreement: dict[str, dict[str, Any]]  # judge pair -> kappa and confusion matrix (two judges or more)

    @property
    def primary(self) -> str:
        return next(iter(self.judges))


def generate_and_judge(ctx: RunContext, intervention: Intervention, steer: str | None, columns: Columns) -> Judged:
    """Generate every column (baseline and steered, cached) and judge it: what a full evaluation and a
    search trial share. Records the ``generate`` and ``score`` timings."""
    cfg = ctx.cfg
    max_new = int(cfg.eval.max_new_tokens)
    decoded = int(cfg.eval.get("generate_new_tokens") or max_new)  # longer: judge the first max_new of each
    t0 = time.perf_counter()
    gen_kwargs = dict(max_new_tokens=decoded, batch_size=int(cfg.eval.batch_size), progress=ctx.progress)
    base, steered = _generate_columns(ctx, intervention, steer, columns, max_new, gen_kwargs)
    ctx.timings["generate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    judges = build_judges(ctx.judges, plugin_dirs(cfg), cfg.cache_dir)
    metrics: dict[str, Any] = {"n_harmful": len(ctx.tokens("harmful_test")), "n_harmless": len(ctx.tokens("harmless_test"))}
    labels, base_labels = _judge_columns(ctx, judges, columns, base, steered, metrics, max_new)
    agreement_of = _agreements(labels) if len(judges) > 1 else {}
    metrics.update({f"judges/kappa/{pair}": a["kappa"] for pair, a in agreement_of.items()})
    ctx.timings["score"] = time.perf_counter() - t1
    return Judged(columns, base, steered, judges, labels, base_labels, metrics, agreement_of)
