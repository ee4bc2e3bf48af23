"""Fit what a run needs, or reuse the artifacts that match (the run's context comes from
:mod:`refusal.context`).

``train.py`` calls :func:`fit` and stops; ``evaluate.py`` calls it too, so an evaluation fits
only what is missing. Artifacts live under ``artifacts_dir/<model>/<data>-<digest>/`` and carry
the model's weights hash and the data digest, so one fitted for another model or data is
refused instead of used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch

from refusal.artifacts import artifact_exists, artifact_paths, load_artifact, save_artifact, sha256_json
from refusal.config import resolve_layer_spec, split_inlp_settings
from refusal.context import RunContext, plain, prepare  # noqa: F401  (refusal.pipeline, an alias of this module, had them)
from refusal.errors import ArtifactError, ArtifactMismatchError
from refusal.fitting import inlp as inlp_fitting
from refusal.fitting import leace as leace_fitting
from refusal.fitting.capture import capture_curve, direction_cosines
from refusal.fitting.cosmic import CosmicConfig, low_similarity_layers, select_cosmic
from refusal.fitting.dim import (
    EXECUTION_ONLY,
    CandidateScorer,
    SelectionConfig,
    dim_candidates_from_means,
    picks_by_rule,
    select_direction,
)
from refusal.fitting.inlp import INLPConfig, INLPResult
from refusal.fitting.leace import LEACEResult
from refusal.fitting.plots import plot_selection
from refusal.fitting.rdo import (
    SIMPLIFICATION,
    RDOConfig,
    RDOResult,
    RDOState,
    frozen,
    model_targets,
    optimise,
    report_convergence,
)
from refusal.fitting.results import DiMDirection, DiMMeans, Fitted
from refusal.fitting.steering import BundleSteerable
from refusal.fitting.threads import FIT_THREADS
from refusal.interventions.base import Intervention
from refusal.interventions.scope import Scope

log = logging.getLogger(__name__)
T = TypeVar("T")


def settings_key(settings: Mapping[str, Any]) -> str:
    """Short digest of the settings that made an artifact: part of its file name, so fits coexist."""
    return sha256_json(settings)[:8]


def _reuse(stem: Path, load: Callable[[], T]) -> T | None:
    """The artifact at ``stem`` when it exists and matches; None (refit) when missing or corrupt. One
    made for another model or data is an error: it is never overwritten or silently used."""
    if not artifact_exists(stem):
        return None
    try:
        return load()
    except ArtifactMismatchError:
        raise
    except ArtifactError as err:  # corrupt, stale or inconsistent: the stored advice is "delete it", we refit
        log.warning("%s; refitting", getattr(err, "problem", err))
        return None


class StepArtifact:
    """A long fit's state after its last step, a checksummed artifact beside the fit's own (``<stem>-progress``): a
    stopped fit resumes there; one made for another model, data or setting is an error, a corrupt one is refitted."""

    def __init__(self, stem: Path, expect: Mapping[str, Any]):
        self.stem, self.expect = stem.with_name(stem.name + "-progress"), dict(expect)

    def read(self, build: Callable[[dict[str, torch.Tensor], dict[str, Any]], T]) -> T | None:
        return _reuse(self.stem, lambda: build(*load_artifact(self.stem, expect=self.expect)))

    def write(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        save_artifact(self.stem, {k: v.contiguous() for k, v in tensors.items()}, {**self.expect, **meta})

    def remove(self) -> None:
        for path in artifact_paths(self.stem):
            path.unlink(missing_ok=True)


class CosmicStepArtifact(StepArtifact):
    """``select_cosmic``'s score tables so far (nan: not scored yet)."""

    def load(self) -> dict[str, torch.Tensor] | None:
        return self.read(lambda tensors, meta: tensors)

    def save(self, tables: dict[str, torch.Tensor]) -> None:
        self.write(tables, {})


# -- DiM ------------------------------------------------------------------------------------------
def fit_dim(ctx: RunContext) -> DiMDirection:
    """The DiM direction for the configured layer spec: pinned, relative, or selected on val."""
    spec = resolve_layer_spec(ctx.cfg.layer, ctx.bundle.n_layers, len(ctx.bundle.post_instruction_ids))
    settings = {k: v for k, v in plain(ctx.cfg.fit.dim).items() if k not in EXECUTION_ONLY}
    selection = {"selection": settings} if spec.mode == "auto" else {}
    if spec.mode == "cosmic":  # its own settings (layer=cosmic), execution-only batch_size left out of the key
        selection = {"cosmic": {k: v for k, v in plain(ctx.cfg.layer).items() if k != "batch_size"}}
    # Keyed by what made it: another selection config is another artifact, never a clash.
    stem = ctx.artifact_dir / (f"dim_{spec.tag}-{settings_key(selection)}" if selection else f"dim_{spec.tag}")
    expect = ctx.expect(layer_spec=spec.tag, **selection)
    if (reused := _reuse(stem, lambda: DiMDirection.load(stem, expect))) is not None:
        log.info("reusing DiM artifact %s", stem)
        return reused
    t0 = time.perf_counter()
    candidates = dim_candidates_from_means(ctx.mean("harmful_train"), ctx.mean("harmless_train"))
    candidates = candidates[: ctx.bundle.n_layers]  # block inputs only
    meta: dict[str, Any] = {**expect, "n_positions": candidates.shape[1], "refusal_filter": ctx.filtered.as_dict()}
    tensors: dict[str, torch.Tensor] = {"candidates": candidates}
    progress: CosmicStepArtifact | None = None  # layer=cosmic only
    if spec.mode == "auto":
        fit_cfg = ctx.cfg.fit.dim
        n = fit_cfg.get("n_prompts")
        scorer = CandidateScorer(
            ctx.bundle, ctx.tokens("harmful_val")[:n], ctx.tokens("harmless_val")[:n],
            batch_size=int(fit_cfg.batch_size), progress=ctx.progress, share_prefix=bool(fit_cfg.get("share_prefix", True)),
        )
        selection_cfg = SelectionConfig(**plain(fit_cfg))
        result = select_direction(candidates, scorer, selection_cfg)
        layer, position = result.layer, result.position
        tensors.update(bypass=result.bypass, induce=result.induce, kl=result.kl)
        meta.update(
            winner=result.winner(), passed_filters=result.passed_filters, scored=result.scored,
            baseline_harmful_score=result.baseline_harmful, baseline_harmless_score=result.baseline_harmless,
            notes=result.notes, decided_by=result.decided_by, picks_by_rule=picks_by_rule(result, selection_cfg),
        )
        plot_selection(result, stem.with_name(f"{stem.name}_selection.png"), title=f"{ctx.bundle.name}: DiM selection")
    elif spec.mode == "cosmic":
        progress = CosmicStepArtifact(stem, expect)
        layer, position = _select_cosmic(ctx, candidates, tensors, meta, progress)
    else:
        layer, position = spec.layer, spec.position
    dim = DiMDirection(candidates[layer, position], layer, position)
    meta.update(layer=layer, position=position, seconds=time.perf_counter() - t0)
    dim.save(stem, meta, tensors)
    if progress is not None:
        progress.remove()  # a finished selection's scores live in its artifact
    ctx.timings["fit_dim"] = time.perf_counter() - t0
    log.info("DiM direction: layer %d position %d (%s)", layer, position, stem)
    return dim


def dim_means(ctx: RunContext, dim: DiMDirection) -> DiMMeans:
    """The train class means at every site at DiM's position, streamed from the activation cache (the
    activations DiM's own fit cached: nothing is extracted again while that cache is kept)."""
    at = dim.position + len(ctx.bundle.post_instruction_ids)
    return DiMMeans(ctx.mean("harmful_train")[:, at].float(), ctx.mean("harmless_train")[:, at].float(), dim.position)


def _select_cosmic(ctx: RunContext, candidates: torch.Tensor, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any], progress: CosmicStepArtifact) -> tuple[int, int]:
    """``layer=cosmic``: COSMIC's pick among the DiM candidates (read layers from the fit split's means)."""
    cfg = CosmicConfig.from_layer_cfg(plain(ctx.cfg.layer))
    n_layers = ctx.bundle.n_layers
    # the cache's residual index i + 1 is block i's output (the last: the final norm's input)
    harm, safe = ctx.mean("harmful_train")[1:, -1], ctx.mean("harmless_train")[1:, -1]
    read = low_similarity_layers(harm[:n_layers], safe[:n_layers], cfg.fraction)
    n = cfg.n_prompts
    model = BundleSteerable(ctx.bundle, {"harmful": ctx.tokens("harmful_val")[:n], "harmless": ctx.tokens("harmless_val")[:n]})
    n_prompts = max(len(model.prompts["harmful"]), len(model.prompts["harmless"]))
    result = select_cosmic(candidates, model, read, cfg, n_prompts, progress)
    tensors.update(refusal_similarity=result.refusal_similarity, steering_similarity=result.steering_similarity, kl=result.kl)
    meta.update(winner=result.winner(), read_layers=result.read_layers, notes=result.notes,
                decided_by=f"COSMIC: max refusal + steering similarity among KL <= {cfg.max_kl}")
    return result.layer, result.position


# -- INLP -----------------------------------------------------------------------------------------
def _inlp_data(ctx: RunContext, split: str, layer: int, position: int, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    at = position if positions == "selected" else None  # else every position, one row each
    harm = ctx.activations(f"harmful_{split}", layer=layer, position=at)
    safe = ctx.activations(f"harmless_{split}", layer=layer, position=at)
    harm, safe = harm.reshape(-1, harm.shape[-1]), safe.reshape(-1, safe.shape[-1])
    X = torch.cat([harm, safe])
    y = torch.cat([torch.ones(len(harm), dtype=torch.long), torch.zeros(len(safe), dtype=torch.long)])
    return X, y


def inlp_settings(ctx: RunContext) -> tuple[str, bool, dict[str, Any]]:
    """(positions, per_layer, the INLPConfig fields) of this run's ``fit.inlp``."""
    return split_inlp_settings(ctx.cfg.fit.inlp)


def _inlp_device_kind(accelerator: str) -> str:
    """``fit.inlp.accelerator`` as Lightning resolves it: ``auto`` is the GPU when there is one."""
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


def fit_inlp(ctx: RunContext, dim: DiMDirection, layer: int | None = None, logger: Any = None):
    """INLP at ``layer`` (default: the DiM layer), fitted by the Lightning fitter; reused when it matches.

    The artifact's name carries a digest of the fit settings and of where it ran (CPU or GPU), so fits
    with other settings coexist instead of refusing each other.
    """
    layer = dim.layer if layer is None else layer
    positions, _, icfg = inlp_settings(ctx)
    # Where it runs changes the last bits (CPU vs GPU kernels; the CPU fit is pinned to FIT_THREADS threads), so
    # the resolved device kind and thread count are part of the key; "auto" and "cpu" on a CPU machine are one fit.
    settings = {k: v for k, v in icfg.items() if k not in ("accelerator", "devices")}
    settings.update(runs_on=_inlp_device_kind(str(icfg.get("accelerator", "auto"))), fit_threads=FIT_THREADS)
    stem = ctx.artifact_dir / f"inlp_L{layer}_P{dim.position}_{positions}-{settings_key(settings)}"
    expect = ctx.expect(layer=layer, position=dim.position, positions=positions, fit_settings=settings)
    if (reused := _reuse(stem, lambda: INLPResult.load(stem, expect=expect))) is not None:
        return reused
    t0 = time.perf_counter()
    X, y = _inlp_data(ctx, "train", layer, dim.position, positions)
    X_val, y_val = _inlp_data(ctx, "val", layer, dim.position, positions)
    result = inlp_fitting.fit_inlp(X, y, X_val, y_val, INLPConfig(**icfg), logger=logger, enable_progress_bar=ctx.progress)
    result.save(stem, extra_meta={k: v for k, v in expect.items() if k != "d_model"})
    ctx.timings["fit_inlp"] = ctx.timings.get("fit_inlp", 0.0) + time.perf_counter() - t0
    log.info("INLP at layer %d: rank %d, stop reason %s (%s)", layer, result.rank, result.stop_reason, stem)
    return result


def fit_leace(ctx: RunContext, dim: DiMDirection):
    """The LEACE eraser on INLP's data (DiM layer, ``fit.inlp.positions``); reused when it matches."""
    positions = inlp_settings(ctx)[0]
    stem = ctx.artifact_dir / f"leace_L{dim.layer}_P{dim.position}_{positions}"
    expect = ctx.expect(layer=dim.layer, position=dim.position, positions=positions)
    if (reused := _reuse(stem, lambda: LEACEResult.load(stem, expect=expect))) is not None:
        return reused
    t0 = time.perf_counter()
    result = leace_fitting.fit_leace(*_inlp_data(ctx, "train", dim.layer, dim.position, positions))
    result.save(stem, {k: v for k, v in expect.items() if k != "d_model"})
    ctx.timings["fit_leace"] = time.perf_counter() - t0
    return result


# -- RDO (the rdo_ablation plugin's own fit) ------------------------------------------------------
class RDOStepArtifact(StepArtifact):
    """``optimise``'s state after its last step (basis, Adam's moments, generator, schedule)."""

    def load(self) -> RDOState | None:
        def state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> RDOState:
            adam = {key.removeprefix("adam."): value for key, value in tensors.items() if key.startswith("adam.")}
            return RDOState(tensors["basis"], tensors["best_basis"], adam, tensors["generator"], meta["history"],
                            float(meta["best"]), int(meta["waited"]), int(meta["reduced"]), float(meta["lr"]))

        return self.read(state)

    def save(self, state: RDOState) -> None:
        tensors = {"basis": state.basis, "best_basis": state.best_basis, "generator": state.generator,
                   **{f"adam.{key}": value for key, value in state.adam.items()}}
        self.write(tensors, {"history": state.history, "best": state.best, "waited": state.waited,
                             "reduced": state.reduced, "lr": state.lr})


def fit_rdo(ctx: RunContext, dim: DiMDirection, cfg: RDOConfig) -> RDOResult:
    """RDO at the DiM layer on the run's fit prompts: reused from a checksummed artifact when its settings,
    model and data match, else trained and saved."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "on_unconverged"}
    stem = ctx.artifact_dir / f"rdo_L{dim.layer}_P{dim.position}_k{cfg.k}-{settings_key(settings)}"
    expect = ctx.expect(layer=dim.layer, position=dim.position, rdo=settings)

    def load() -> RDOResult:
        tensors, meta = load_artifact(stem, expect=expect)
        log.info("reusing RDO artifact %s", stem)
        return RDOResult(tensors["basis"], meta["history"], int(meta["best_step"]), bool(meta["converged"]), meta["note"])

    result = _reuse(stem, load)
    if result is None:
        t0 = time.perf_counter()
        n = cfg.n_prompts
        model = BundleSteerable(ctx.bundle, {"harmful": ctx.tokens("harmful_train")[:n],
                                             "harmless": ctx.tokens("harmless_train")[:n]})
        progress = RDOStepArtifact(stem, expect)
        with frozen(ctx.bundle.model):
            targets = model_targets(model, dim.direction, dim.layer)
            result = optimise(model, dim.direction, dim.layer, targets, cfg, progress)
        save_artifact(stem, {"basis": result.basis.contiguous()},
                      {**expect, "history": result.history, "best_step": result.best_step, "converged": result.converged,
                       "note": result.note, "simplified": SIMPLIFICATION, "seconds": time.perf_counter() - t0})
        progress.remove()
        ctx.timings["fit_rdo"] = time.perf_counter() - t0
    report_convergence(result, cfg)
    return result


def fit(ctx: RunContext, needs: set[str] | None = None, logger: Any = None) -> Fitted:
    """Fit (or reuse) what ``needs`` names: "dim", "dim_means", "inlp", "leace" (all but DiM need DiM's layer or position)."""
    needs = {"dim", "inlp"} if needs is None else set(needs)
    fitted = Fitted()
    if needs & {"dim", "dim_means", "inlp", "leace"}:
        fitted.dim = fit_dim(ctx)
    if "dim_means" in needs:
        fitted.dim_means = dim_means(ctx, fitted.dim)
    if "inlp" in needs:
        fitted.inlp = fit_inlp(ctx, fitted.dim, logger=logger)
        fitted.inlp_layer = fitted.dim.layer
    if "leace" in needs:
        fitted.leace = fit_leace(ctx, fitted.dim)
    return fitted


def fit_for(ctx: RunContext, cls: type, icfg: Mapping[str, Any], geometry: bool = False) -> Fitted:
    """What one intervention needs (plus DiM for geometry); with ``fit.inlp.per_layer=true``, an INLP
    fit at every layer in the intervention's scope (each cached like any artifact)."""
    fitted = fit(ctx, set(cls.needs) | ({"dim"} if geometry else set()))
    if "inlp" in cls.needs and inlp_settings(ctx)[1]:
        selected = icfg.get("layer") if icfg.get("layer") is not None else fitted.dim.layer
        layers = Scope.from_config(icfg, cls.default_layers).resolve(ctx.bundle.n_layers, selected)
        fitted.inlp_by_layer = {layer: fit_inlp(ctx, fitted.dim, layer) for layer in layers}
    if cls.fit_extra.__func__ is not Intervention.fit_extra.__func__:  # a plugin's own fit (multi-direction, RDO)
        fitted.extra[cls.name] = cls.fit_extra(ctx, fitted, icfg)
    return fitted


def inlp_record(fitted: Fitted) -> dict[str, Any]:
    """What fitted.json and results.json say about INLP: rank, stop reason, accuracies, capture and alignment."""
    inlp = fitted.inlp
    out: dict[str, Any] = {
        "rank": inlp.rank, "n_useful": inlp.n_useful, "stop_reason": inlp.stop_reason,
        "chance": inlp.chance, "cap": inlp.config.get("n_iterations"),
        "val_accuracy": [round(a, 4) for a in inlp.val_accuracy],
        "train_accuracy": [round(a, 4) for a in inlp.train_accuracy],
    }
    if fitted.dim is not None:
        out["capture"] = [round(c, 4) for c in capture_curve(inlp.directions, fitted.dim.direction).tolist()]
        out["cos_with_dim"] = [round(c, 4) for c in direction_cosines(inlp.directions, fitted.dim.direction).tolist()]
    if fitted.inlp_by_layer:
        out["per_layer"] = {str(layer): {"rank": r.rank, "stop_reason": r.stop_reason}
                            for layer, r in sorted(fitted.inlp_by_layer.items())}
    return out


def summary(ctx: RunContext, fitted: Fitted) -> Mapping[str, Any]:
    out: dict[str, Any] = {"model": ctx.bundle.name, "data": ctx.splits.source, "sizes": ctx.splits.sizes(),
                           "refusal_filter": ctx.filtered.as_dict()}
    if fitted.dim is not None:
        out.update(layer=fitted.dim.layer, n_layers=ctx.bundle.n_layers, position=fitted.dim.position)
    if fitted.inlp is not None:
        out.update(inlp_rank=fitted.inlp.rank, inlp=inlp_record(fitted))
    return out
