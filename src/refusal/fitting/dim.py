"""Difference-in-means refusal directions and their selection (Arditi et al. 2024).

Candidates are mean(harmful) − mean(harmless) of the cached residual activations at every
layer and post-instruction position. Each candidate is scored on the val split by three
numbers: *bypass* (mean first-token refusal score of harmful prompts under directional
ablation; lower is better), *induce* (the same on harmless prompts under activation addition
at its layer; must be > 0) and *KL* of the harmless last-position next-token distribution under
ablation (must stay small). Candidates are evaluated many at a time: each batch row carries its
own direction, so one forward pass scores several candidates, and the unsteered logits are
computed once and reused.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from refusal.hooks import HookSpec, hooked
from refusal.metrics import refusal_score
from refusal.models.bundle import ModelBundle

log = logging.getLogger(__name__)


def dim_candidates(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """``[n, sites, P, d]`` activations of each class -> ``[sites, P, d]`` mean differences."""
    return harmful.mean(dim=0) - harmless.mean(dim=0)


@dataclass
class SelectionConfig:
    max_kl: float = 0.1
    min_induce: float = 0.0
    prune_last_fraction: float = 0.2
    positions: str = "all"  # "all" or "last"
    shortlist: int = 0  # >0: last position for every layer first, then all positions of the best N layers
    n_prompts: int | None = None  # val prompts per class used for scoring (applied by the caller)
    batch_size: int = 32


@dataclass
class SelectionResult:
    layer: int
    position: int  # negative offset into the post-instruction tokens
    bypass: torch.Tensor  # [n_layers, P], nan where not scored
    induce: torch.Tensor
    kl: torch.Tensor
    baseline_harmful: float
    baseline_harmless: float
    passed_filters: bool
    scored: int = 0
    notes: list[str] = field(default_factory=list)

    def winner(self) -> dict[str, float]:
        p = self.position + self.bypass.shape[1]
        return {
            "bypass": float(self.bypass[self.layer, p]),
            "induce": float(self.induce[self.layer, p]),
            "kl": float(self.kl[self.layer, p]),
        }


def _kl_rows(base_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    base = torch.log_softmax(base_logits.float(), -1)
    new = torch.log_softmax(new_logits.float(), -1)
    return (base.exp() * (base - new)).sum(-1)


class CandidateScorer:
    """Scores many candidate directions with per-row hooks (rows = candidate × prompt)."""

    def __init__(self, bundle: ModelBundle, harmful_ids: Sequence[Sequence[int]], harmless_ids: Sequence[Sequence[int]],
                 batch_size: int = 32, progress: bool = True):
        self.bundle = bundle
        self.harmful_ids = list(harmful_ids)
        self.harmless_ids = list(harmless_ids)
        self.batch_size = batch_size
        self.progress = progress
        self._state: dict[str, torch.Tensor | None] = {}
        self.baseline_harmless_logits = self._last_logits(self.harmless_ids, [])

    @torch.inference_mode()
    def _last_logits(self, rows: Sequence[Sequence[int]], specs: list[HookSpec]) -> torch.Tensor:
        batch = self.bundle.pad(rows).to(self.bundle.device)
        with hooked(specs):
            out = self.bundle.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, logits_to_keep=1,
            )
        return out.logits[:, -1].float()

    def _ablation_specs(self) -> list[HookSpec]:
        def fn(x: torch.Tensor) -> torch.Tensor:
            unit = self._state["unit"][:, None, :]
            return x - (x * unit).sum(-1, keepdim=True) * unit

        layout = self.bundle.layout
        specs = [HookSpec(b, fn, "pre") for b in layout.blocks]
        specs += [HookSpec(m, fn, "post") for m in (*layout.attn_writers, *layout.mlp_writers)]
        return specs

    def _actadd_specs(self, layers: Sequence[int]) -> list[HookSpec]:
        def make(layer: int):
            def fn(x: torch.Tensor) -> torch.Tensor:
                shift = self._state["shift"][layer]
                return x if shift is None else x + shift[:, None, :]
            return fn

        return [HookSpec(self.bundle.layout.blocks[li], make(li), "pre") for li in sorted(set(layers))]

    def score(self, directions: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bypass, induce, KL for each candidate ``directions[i]`` (read at ``layers[i]``)."""
        dev, dt = self.bundle.device, self.bundle.dtype
        units = (directions / directions.norm(dim=-1, keepdim=True)).to(dev, dt)
        directions = directions.to(dev, dt)
        n_harm, n_safe = len(self.harmful_ids), len(self.harmless_ids)
        per_batch = max(1, self.batch_size // max(n_harm, n_safe))
        bypass, induce, kl = [], [], []
        ablation = self._ablation_specs()
        actadd = self._actadd_specs(layers)
        chunks = range(0, len(units), per_batch)
        for start in tqdm(chunks, desc="scoring DiM candidates", disable=not self.progress, unit="batch"):
            idx = list(range(start, min(start + per_batch, len(units))))
            # ablation: harmful rows (bypass) and harmless rows (KL), one pass
            rows = [r for _ in idx for r in self.harmful_ids] + [r for _ in idx for r in self.harmless_ids]
            unit_rows = torch.cat([units[i].expand(n_harm, -1) for i in idx] + [units[i].expand(n_safe, -1) for i in idx])
            self._state["unit"] = unit_rows
            logits = self._last_logits(rows, ablation)
            harm_scores = refusal_score(logits[: len(idx) * n_harm], self.bundle.refusal_token_ids).view(len(idx), n_harm)
            safe_logits = logits[len(idx) * n_harm :].view(len(idx), n_safe, -1)
            bypass.append(harm_scores.mean(1))
            kl.append(torch.stack([_kl_rows(self.baseline_harmless_logits, safe_logits[j]).mean() for j in range(len(idx))]))
            # activation addition at each candidate's layer on harmless rows (induce)
            shift = {li: None for li in set(layers)}
            for j, i in enumerate(idx):
                block = shift[layers[i]]
                if block is None:
                    block = shift[layers[i]] = torch.zeros(len(idx) * n_safe, directions.shape[-1], device=dev, dtype=dt)
                block[j * n_safe : (j + 1) * n_safe] = directions[i]
            self._state["shift"] = shift
            logits = self._last_logits([r for _ in idx for r in self.harmless_ids], actadd)
            induce.append(refusal_score(logits, self.bundle.refusal_token_ids).view(len(idx), n_safe).mean(1))
        self._state.clear()
        return torch.cat(bypass).cpu(), torch.cat(induce).cpu(), torch.cat(kl).cpu()

    def baselines(self) -> tuple[float, float]:
        harm = self._last_logits(self.harmful_ids, [])
        return (
            float(refusal_score(harm, self.bundle.refusal_token_ids).mean()),
            float(refusal_score(self.baseline_harmless_logits, self.bundle.refusal_token_ids).mean()),
        )


def eligible_layers(n_layers: int, prune_last_fraction: float) -> list[int]:
    """Layers before the last ``prune_last_fraction`` of the model (late layers only restate the output)."""
    limit = n_layers - math.floor(prune_last_fraction * n_layers)
    return list(range(max(1, limit)))


def select_direction(
    candidates: torch.Tensor, scorer: CandidateScorer, cfg: SelectionConfig
) -> SelectionResult:
    """Score candidates (``[n_layers, P, d]``) and pick the filtered one with the lowest bypass score."""
    n_layers, n_pos, _ = candidates.shape
    bypass = torch.full((n_layers, n_pos), math.nan)
    induce = bypass.clone()
    kl = bypass.clone()
    layers = eligible_layers(n_layers, cfg.prune_last_fraction)

    norms = candidates.norm(dim=-1)
    degenerate = norms <= 1e-6 * float(norms.max())  # e.g. layer 0: identical post-instruction embeddings

    def run(pairs: list[tuple[int, int]]) -> None:
        pairs = [(li, p) for li, p in pairs if math.isnan(bypass[li, p]) and not degenerate[li, p]]
        if not pairs:
            return
        dirs = torch.stack([candidates[li, p] for li, p in pairs])
        b, i, k = scorer.score(dirs, [li for li, _ in pairs])
        for j, (li, p) in enumerate(pairs):
            bypass[li, p], induce[li, p], kl[li, p] = b[j], i[j], k[j]

    if cfg.positions == "last" or cfg.shortlist > 0:
        run([(li, n_pos - 1) for li in layers])
    if cfg.positions == "all":
        if cfg.shortlist > 0:
            last = [(li, n_pos - 1) for li in layers if not math.isnan(bypass[li, -1])]
            pool, _ = _filter(bypass, induce, kl, last, cfg)
            best = sorted(pool, key=lambda lp: float(bypass[lp]))[: cfg.shortlist]
            run([(li, p) for li, _ in best for p in range(n_pos)])
        else:
            run([(li, p) for li in layers for p in range(n_pos)])

    scored = [(li, p) for li in range(n_layers) for p in range(n_pos) if not math.isnan(bypass[li, p])]
    pool, fallback = _filter(bypass, induce, kl, scored, cfg)
    notes = []
    if degenerate.any():
        notes.append(f"skipped {int(degenerate.sum())} zero-norm candidates (no harmful/harmless difference there)")
    if fallback:
        notes.append(fallback)
        warnings.warn(fallback, stacklevel=2)
    layer, pos = min(pool, key=lambda lp: float(bypass[lp]))
    base_harm, base_safe = scorer.baselines()
    return SelectionResult(
        layer=layer, position=pos - n_pos, bypass=bypass, induce=induce, kl=kl,
        baseline_harmful=base_harm, baseline_harmless=base_safe, passed_filters=fallback is None,
        scored=len(scored), notes=notes,
    )


def _filter(bypass, induce, kl, pairs: list[tuple[int, int]], cfg: SelectionConfig) -> tuple[list[tuple[int, int]], str | None]:
    """Candidates that pass both filters; failing that, those that pass the KL filter; failing that, all.

    A weakly refusing model (e.g. a coder model) often has no direction whose addition pushes
    harmless prompts past even odds of refusing; dropping the induce filter then still keeps the
    KL guard against directions that break the model. The second value says which fallback was taken.
    """
    both = [lp for lp in pairs if kl[lp] <= cfg.max_kl and induce[lp] > cfg.min_induce]
    if both:
        return both, None
    kl_only = [lp for lp in pairs if kl[lp] <= cfg.max_kl]
    if kl_only:
        return kl_only, (
            f"no candidate passed both filters (KL <= {cfg.max_kl}, induce > {cfg.min_induce}); chose among the "
            f"{len(kl_only)} that pass the KL filter — actadd never made harmless prompts likelier to refuse than not"
        )
    return pairs, (
        f"no candidate passed the filters (KL <= {cfg.max_kl}, induce > {cfg.min_induce}); "
        "took the lowest bypass score regardless — the model may barely refuse"
    )
