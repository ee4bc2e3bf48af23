"""Lean evaluation for search trials (``eval=trial``, i.e. ``eval.lean=true``): what a Pareto search
scores, and nothing else.

A trial measures refusal on the harmful test prompts (steered greedy generation, judged) and the
next-token KL(unsteered ‖ steered) on the harmless test prompts (one forward pass each, last prompt
position). The subsets are fixed: the first ``data.n_test`` prompts of each class. Teacher-forced
perplexity, geometry and the named test sets are left out: they cost more than the trial itself and
run once, for the front (the same overrides without ``eval=trial``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from omegaconf import OmegaConf

from refusal.context import RunContext
from refusal.errors import ConfigError
from refusal.evaluation.judging import generate_and_judge
from refusal.evaluation.records import (
    add_constraints,
    add_paired,
    completion_rows,
    measure_capability,
    run_record,
    warn_if_barely_refuses,
    write_outputs,
)
from refusal.fitting.results import Fitted
from refusal.interventions import Intervention
from refusal.metrics import KLDivergence
from refusal.metrics.names import HARMLESS_KL
from refusal.models.bundle import ModelBundle
from refusal.runtime.activations import batches_by_length
from refusal.runtime.prefix import forward, prompt_prefix_cache, shared_prefix
from refusal.runtime.roles import declare_roles


@torch.inference_mode()
def next_token_logits(bundle: ModelBundle, prompts: Sequence[Sequence[int]], intervention: Intervention | None,
                      batch_size: int) -> Float[torch.Tensor, "n vocab"]:
    """Float32 logits (CPU) at the last position of every prompt, steered by ``intervention`` unless None.

    Only the last position's logits are computed, and the chat-template prefix every prompt shares runs
    once per batch, steered like the rest (:mod:`refusal.runtime.prefix`). Token roles are declared for both
    passes, so position-scoped interventions edit exactly the positions they would in one plain pass.
    """
    prefix = shared_prefix(prompts, len(bundle.post_instruction_ids))
    out: torch.Tensor | None = None
    for idx in batches_by_length([len(p) for p in prompts], batch_size):
        rows = [prompts[i][len(prefix):] for i in idx]
        with intervention.apply(bundle) if intervention is not None else nullcontext():
            past = prompt_prefix_cache(bundle, prefix, len(rows)) if prefix else None
            with declare_roles(bundle, [len(r) for r in rows], max(map(len, rows))):
                logits = forward(bundle, rows, offset=len(prefix), past=past).logits[:, -1].float().cpu()
        if out is None:
            out = torch.empty((len(prompts), logits.shape[-1]), dtype=torch.float32)
        out[torch.tensor(idx)] = logits
    assert out is not None, "no prompts"
    return out


def next_token_kl(bundle: ModelBundle, prompts: Sequence[Sequence[int]], intervention: Intervention | None,
                  batch_size: int) -> float:
    """Mean KL(unsteered ‖ steered) of the next-token distributions at the last prompt position (0 without
    an intervention); the unsteered logits are kept on the held model for the next trial."""
    unsteered = bundle.remember("next_token_logits", [list(p) for p in prompts],
                                lambda: next_token_logits(bundle, prompts, None, batch_size))
    if intervention is None:
        return 0.0
    metric = KLDivergence()
    metric.update(unsteered, next_token_logits(bundle, prompts, intervention, batch_size))
    return float(metric.compute())


def measures(key: str, capability_tasks: Sequence[str] = ()) -> bool:
    """Whether a lean trial reports the metric ``key`` (for checking ``optimize`` before a search starts):
    refusal, next-token KL, and the ``capability/<task>/...`` group of every task in ``eval.capability.tasks``."""
    if key.startswith("capability/"):
        return key.split("/")[1] in capability_tasks
    return key.startswith(("harmful/", "baseline/harmful/")) or key in (HARMLESS_KL, "n_harmful", "n_harmless")


def objectives(results: dict[str, Any], keys: Sequence[str] | None) -> float | list[float] | None:
    """What the job returns to a sweeper: the metrics named by ``eval.optimize``, in order (a float when one).
    None when nothing asks (no ``eval.optimize``), so plain runs and the basic sweeper are unaffected."""
    if not keys:
        return None
    metrics = results.get("metrics") or {}
    numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    missing = [k for k in keys if k not in numeric]
    if missing:
        raise ConfigError(f"eval.optimize={list(keys)} names {missing}, which this run did not measure; it measured: "
                          f"{', '.join(numeric)}")
    values = [float(metrics[k]) for k in keys]
    return values[0] if len(values) == 1 else values


def evaluate_lean(ctx: RunContext, intervention: Intervention, fitted: Fitted, output_dir: Path,
                  tracker: Any = None, benchmarks: dict[str, Any] | None = None) -> dict[str, Any]:
    """One search trial on a prepared context with a built intervention; writes results.json and
    completions.jsonl (harmful prompts) like a full evaluation, with only the lean metrics, plus the
    capability group when ``eval.capability.tasks`` names benchmarks (``benchmarks``: their items), so a
    search can optimise or constrain capability."""
    cfg, bundle = ctx.cfg, ctx.bundle
    steer = intervention.steering_key(bundle.n_layers)
    judged = generate_and_judge(ctx, intervention, steer, [("harmful", "harmful_test", "harmful")])
    t0 = time.perf_counter()
    judged.metrics[HARMLESS_KL] = next_token_kl(bundle, ctx.tokens("harmless_test"), None if steer is None else intervention,
                                                      max(1, int(cfg.eval.batch_size) // 2))
    ctx.timings["score"] += time.perf_counter() - t0
    capability = measure_capability(ctx, benchmarks, intervention, steer, output_dir, judged.metrics)
    warn_if_barely_refuses(bundle, judged.metrics)
    results = {**run_record(ctx, intervention, fitted, judged), "eval": "lean",
               "optimize": OmegaConf.to_container(cfg.eval.optimize) if cfg.eval.get("optimize") else None,
               "timings": dict(ctx.timings)}
    if capability is not None:
        results["capability"] = capability
    rows = completion_rows(ctx, judged)
    add_paired(results, rows, steer)
    add_constraints(results, cfg)
    write_outputs(output_dir, results, rows)
    if tracker is not None:
        tracker.log_results(results, rows, images=[])
    return results
