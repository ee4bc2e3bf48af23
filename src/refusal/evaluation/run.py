"""The body of ``evaluate.py``: fit what is missing, steer, generate, score, save (the jobs live in
:mod:`~refusal.evaluation.judging`, :mod:`~refusal.evaluation.scoring` and :mod:`~refusal.evaluation.records`).

Per run: refusal on harmful and harmless test prompts (substring rate on greedy completions and
first-token log-odds), perplexity of the unsteered model's own harmless completions under the
intervention, and KL between unsteered and steered next-token distributions on harmless
prompts (last prompt position and over the completion).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning
from omegaconf import DictConfig

from refusal.artifacts import atomic_write_json
from refusal.capability import enabled, load_benchmarks
from refusal.config import intervention_config, plugin_dirs
from refusal.context import RunContext, prepare
from refusal.evaluation.judging import generate_and_judge
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
from refusal.evaluation.resume import config_fingerprint, finished_run
from refusal.evaluation.scoring import cached_scores, teacher_forced_scores
from refusal.evaluation.trial import evaluate_lean
from refusal.fits import fit_for, inlp_record
from refusal.geometry.collect import run_geometry
from refusal.interventions import get_intervention
from refusal.judges.quality import (
    QualityScorer,
    annotate_rows,
    quality_columns,
    quality_metrics,
    score_columns,
)
from refusal.metrics.names import column_metric
from refusal.models.gguf_export import export_packaged_gguf
from refusal.tracking import make_tracker

log = logging.getLogger(__name__)


def evaluate_context(ctx: RunContext, output_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Run one evaluation on a prepared context; writes results.json and completions.jsonl."""
    cfg, bundle = ctx.cfg, ctx.bundle
    t0 = time.perf_counter()
    cls = get_intervention(str(cfg.intervention.name), plugin_dirs(cfg))
    icfg = intervention_config(cfg)
    lean = bool(cfg.eval.get("lean", False))  # a search trial (eval=trial): refusal and next-token KL only
    benchmarks = load_benchmarks(cfg) if enabled(cfg) else None  # missing data fails before the fit
    # columns: the main test split's two classes, then every named test set (label: what refusal means there)
    columns = [("harmful", "harmful_test", "harmful"), ("harmless", "harmless_test", "harmless"),
               *((s.name, s.name, s.label) for s in ctx.test_sets)]
    scorer = None
    if cfg.eval.get("quality") and not lean:  # loads the judge model and checks its answer tokens before the fit
        scorer = QualityScorer(cfg.eval.quality_judge, cfg.cache_dir)
        quality_columns(scorer.cfg, columns)
        scorer.layout()
    fitted = fit_for(ctx, cls, icfg, geometry=bool(cfg.get("geometry", {}).get("enabled", False)) and not lean)
    intervention = cls(icfg, fitted)
    intervention.hook_specs(bundle)  # builds every hook once: a bad k or layer fails here, before generation
    ctx.timings["fit"] = time.perf_counter() - t0
    if lean:
        return evaluate_lean(ctx, intervention, fitted, output_dir, tracker, benchmarks)

    steer = intervention.steering_key(bundle.n_layers)
    judged = generate_and_judge(ctx, intervention, steer, columns)
    t2 = time.perf_counter()

    def scores(steer: str | None) -> dict[str, Any]:
        return cached_scores(
            Path(cfg.cache_dir) / "scores" / bundle.name,
            {"w": bundle.weights_hash, **bundle.numerics_key(), "p": ctx.tokens("harmless_test"), "c": judged.base["harmless"].completion_ids, "steer": steer},
            lambda: teacher_forced_scores(bundle, ctx.tokens("harmless_test"), judged.base["harmless"].completion_ids,
                                          None if steer is None else intervention, max(1, int(cfg.eval.batch_size) // 2)),
        )

    tf, base_tf = scores(steer), scores(None)  # the baseline's: no forward pass (the unsteered logits are kept when small)
    per_prompt = {**{k: tf["per_prompt"][k] for k in ("nll", "tokens", "kl_div", "kl_div_completion")},  # fixed order:
                  "baseline_nll": base_tf["per_prompt"]["nll"]}  # a cached entry comes back with sorted keys
    judged.metrics.update({column_metric("harmless", k): v for k, v in tf.items() if k != "per_prompt"})
    ctx.timings["score"] += time.perf_counter() - t2
    capability = measure_capability(ctx, benchmarks, intervention, steer, output_dir, judged.metrics)
    quality = {}
    if scorer is not None:
        t_quality = time.perf_counter()
        quality = score_columns(scorer, ctx, judged)
        judged.metrics.update(quality_metrics(quality))
        ctx.timings["quality"] = time.perf_counter() - t_quality
    warn_if_barely_refuses(bundle, judged.metrics)

    results = run_record(ctx, intervention, fitted, judged)
    results["test_sets"] = {s.name: {"label": s.label, "source": s.source, "n": len(s.instructions),
                                     "dropped_overlap": s.dropped_overlap, "dropped_near": s.dropped_near}
                            for s in ctx.test_sets}
    if capability is not None:
        results["capability"] = capability
    if fitted.inlp is not None:
        results["inlp"] = inlp_record(fitted)
    if cfg.get("geometry", {}).get("enabled", False) and fitted.dim is not None:
        t3 = time.perf_counter()
        results["geometry"] = run_geometry(ctx, fitted, intervention, output_dir)
        ctx.timings["geometry"] = time.perf_counter() - t3
    if cfg.intervention.get("export", False) and (exported := intervention.export_weights(bundle, output_dir / "orthogonalized")):
        results["exported_checkpoint"] = str(exported)
        if bundle.source == "gguf_package":
            results["exported_gguf"] = export_packaged_gguf(cfg.model, cfg.cache_dir, bundle, ctx.tokens("harmful_test")[:4],
                                                            exported, output_dir / "orthogonalized.gguf")
    results["timings"] = dict(ctx.timings)
    rows = completion_rows(ctx, judged)
    annotate_rows(rows, quality)
    for row, *values in zip((r for r in rows if r["split"] == "harmless"), *per_prompt.values(), strict=True):
        row.update(zip(per_prompt, values, strict=True))  # nll, tokens, kl_div, kl_div_completion, baseline_nll
    add_paired(results, rows, steer)
    add_constraints(results, cfg)
    write_outputs(output_dir, results, rows)
    if tracker is not None:
        tracker.log_results(results, rows, images=sorted(output_dir.glob("*.png")))
    return results


def run_evaluation(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Seed, prepare, evaluate, log; a failure is recorded in results.json before it propagates."""
    output_dir = Path(output_dir)
    fingerprint = config_fingerprint(cfg)
    if cfg.get("resume", False) and (done := finished_run(output_dir, fingerprint)) is not None:
        log.info("resume: %s already holds this configuration's finished run (config %s); not run again "
                 "(delete the folder to redo it)", output_dir, fingerprint[:12])
        return done
    t0 = time.perf_counter()
    tracker = None
    try:  # a bad logger or config is this job's failure too: recorded, so a multirun's report lists it
        lightning.seed_everything(cfg.seed, verbose=False)
        tracker = make_tracker(cfg, output_dir)
        ctx = prepare(cfg)
        results = evaluate_context(ctx, output_dir, tracker)
    except BaseException as err:
        atomic_write_json(output_dir / "results.json", {
            "status": "failed", "model": cfg.model.name, "intervention": cfg.intervention.name,
            "error": f"{type(err).__name__}: {err}", "versions": versions(),
        })
        if tracker is not None:
            tracker.finish(exit_code=1)
        raise
    results["timings"]["total"] = time.perf_counter() - t0
    results["config_sha256"] = fingerprint  # written last: a run that has it is complete (resume=true)
    atomic_write_json(output_dir / "results.json", results)
    if tracker is not None:
        tracker.finish()
    return results
