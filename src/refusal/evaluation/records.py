"""What a run writes: the results.json record every run has, completions.jsonl rows, paired differences
from the run's own baseline, the capability group and the constraints' verdict (shared by full runs and
lean trials), and the package versions."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

from refusal.artifacts import atomic_write_json, atomic_write_text
from refusal.capability import evaluate_capability
from refusal.compare import RunOutcomes, vs_baseline
from refusal.constraints import feasible, parse_constraints
from refusal.context import RunContext
from refusal.evaluation.judging import Judged
from refusal.fitting.results import Fitted
from refusal.interventions import Intervention
from refusal.metrics.names import BASELINE_HARMFUL_REFUSAL
from refusal.models.bundle import ModelBundle
from refusal.run_files import COMPLETIONS


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("refusal", "torch", "transformers", "lightning", "torchmetrics"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def warn_if_barely_refuses(bundle: ModelBundle, metrics: dict[str, Any]) -> None:
    rate = metrics[BASELINE_HARMFUL_REFUSAL]
    if rate < 0.1:
        note = (f"{bundle.name} refuses only {rate:.0%} of harmful test prompts without intervention: "
                "it barely refuses, so suppression numbers say little")
        warnings.warn(note, stacklevel=3)
        metrics["warning"] = note


def run_record(ctx: RunContext, intervention: Intervention, fitted: Fitted, judged: Judged) -> dict[str, Any]:
    """The results.json fields every run has: what ran, where, with which data and judges, and its metrics."""
    bundle = ctx.bundle
    record: dict[str, Any] = {
        "status": "ok",
        "model": bundle.name,
        "intervention": intervention.name,
        "params": intervention.params(),
        "layer": fitted.dim.layer if fitted.dim is not None else None,
        "position": fitted.dim.position if fitted.dim is not None else None,
        "intervention_layer": intervention.layer,
        "scope": {"layers": intervention.layers(bundle.n_layers), "positions": intervention.scope.positions},
        "max_new_tokens": int(ctx.cfg.eval.max_new_tokens),
        "metrics": judged.metrics,
        "judge": judged.primary,  # the primary judge (the plain refusal_rate keys); all of them under "judges"
        "judges": {name: judge.cfg for name, judge in judged.judges.items()},
        "data": {"source": ctx.splits.source, "digest": ctx.splits.digest(), "fit_digest": ctx.splits.fit_digest(), "sizes": ctx.splits.sizes(),
                 "refusal_filter": ctx.filtered.as_dict()},
        "weights_hash": bundle.weights_hash,
        "numerics": bundle.numerics,
        "model_reused": ctx.model_reused,
        "seed": int(ctx.cfg.seed),
        "versions": versions(),
    }
    if judged.agreement:
        record["judge_agreement"] = judged.agreement
    return record


def measure_capability(ctx: RunContext, benchmarks: dict[str, Any] | None, intervention: Intervention, steer: str | None,
                       output_dir: Path, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The capability group (``capability/<task>/...`` into ``metrics``; the results.json record returned) when
    ``benchmarks`` holds items, else None; timed as ``capability``."""
    if not benchmarks:
        return None
    t0 = time.perf_counter()
    found, record = evaluate_capability(ctx.cfg, ctx.bundle, benchmarks, intervention, steer, output_dir)
    metrics.update(found)
    ctx.timings["capability"] = time.perf_counter() - t0
    return record


def add_constraints(results: dict[str, Any], cfg: Any) -> None:
    """The ``eval.constraints`` a run ran under (results.json) and whether its metrics met them (``feasible``)."""
    constraints = parse_constraints(cfg.eval.get("constraints"))
    if constraints:
        results["constraints"] = [str(c) for c in constraints]
        results["metrics"]["feasible"] = feasible(results["metrics"], constraints)


def add_paired(results: dict[str, Any], rows: list[dict[str, Any]], steer: str | None) -> None:
    """The prompts' digests (``results["prompts"]``: what pairs two runs) and, for a steered run, its paired
    differences from its own unsteered completions on the same prompts (``…_vs_baseline`` metrics)."""
    outcomes = RunOutcomes.from_rows(rows)
    results["prompts"] = outcomes.digests
    if steer is not None:
        results["metrics"].update(vs_baseline(outcomes))


def completion_rows(ctx: RunContext, judged: Judged) -> list[dict[str, Any]]:
    """completions.jsonl: every prompt of every column with its steered and baseline completion and verdicts."""
    max_new, rows = int(ctx.cfg.eval.max_new_tokens), []
    for column, split, label in judged.columns:
        steered, labels = judged.steered[column], judged.labels
        for i, (text, completion, baseline) in enumerate(
            zip(ctx.texts(split), steered.completions, judged.base[column].completions, strict=True)
        ):
            verdicts = {name: {"label": labels[name][column][i].label, "score": labels[name][column][i].score}
                        for name in judged.judges}
            rows.append({"split": column, "label": label, "prompt": text, "completion": completion,
                         "refused": verdicts[judged.primary]["label"] == "refusal",
                         "baseline_refused": judged.base_labels[column][i] == "refusal", "judges": verdicts,
                         "hit_token_limit": len(steered.completion_ids[i]) >= max_new, "baseline_completion": baseline})
    return rows


def write_outputs(output_dir: Path, results: dict[str, Any], rows: list[dict]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / COMPLETIONS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(output_dir / "results.json", results)
