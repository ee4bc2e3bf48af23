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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from refusal.metrics import refusal_score
from refusal.models.bundle import ModelBundle
from refusal.models.placement import devices_of, module_device
from refusal.runtime.hooks import HookSpec, hooked
from refusal.runtime.prefix import common_prefix, continue_rows, forward, prefix_cache

log = logging.getLogger(__name__)


def dim_candidates(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """``[n, sites, P, d]`` activations of each class -> ``[sites, P, d]`` mean differences."""
    return dim_candidates_from_means(harmful.mean(dim=0), harmless.mean(dim=0))


def dim_candidates_from_means(
    harmful_mean: Float[torch.Tensor, "sites n_pos d_model"], harmless_mean: Float[torch.Tensor, "sites n_pos d_model"]
) -> Float[torch.Tensor, "sites n_pos d_model"]:
    """The same from each class's mean (streamed from the activation cache: every layer of a split
    never has to be in memory at once)."""
    if harmful_mean.shape != harmless_mean.shape or harmful_mean.ndim != 3:
        raise ValueError(f"expected two [sites, P, d] means, got {tuple(harmful_mean.shape)} and {tuple(harmless_mean.shape)}")
    return harmful_mean - harmless_mean


INDUCE_RULES = ("relative", "absolute")

#: SelectionConfig fields that change how fast scores are computed, never what they are.
EXECUTION_ONLY = ("batch_size", "share_prefix")


@dataclass
class SelectionConfig:
    max_kl: float = 0.1
    min_induce: float = 0.0
    # "relative": actadd must raise the harmless refusal score by more than min_induce over the
    # unsteered harmless score; "absolute" (Arditi et al.): the score itself must exceed min_induce.
    induce_rule: str = "relative"
    prune_last_fraction: float = 0.2
    positions: str = "all"  # "all" or "last"
    shortlist: int = 0  # >0: last position for every layer first, then all positions of the best N layers
    n_prompts: int | None = None  # val prompts per class used for scoring (applied by the caller)
    batch_size: int = 32
    share_prefix: bool = True  # run the prompts' common prefix once per candidate (same scores, fewer FLOPs)

    def __post_init__(self) -> None:
        if self.induce_rule not in INDUCE_RULES:
            raise ValueError(f"fit.dim.induce_rule={self.induce_rule!r}: choose one of {', '.join(INDUCE_RULES)}")

    def induce_threshold(self, baseline_harmless: float) -> float:
        return self.min_induce + (baseline_harmless if self.induce_rule == "relative" else 0.0)

    def induce_filter(self, baseline_harmless: float) -> str:
        if self.induce_rule == "relative":
            return f"induce >= unsteered harmless {baseline_harmless:.2f} + {self.min_induce}"
        return f"induce >= {self.min_induce}"


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
    decided_by: str = ""  # the filters the winner passed (which induce rule, or the fallback taken)
    notes: list[str] = field(default_factory=list)

    def winner(self) -> dict[str, float]:
        p = self.position + self.bypass.shape[1]
        return {
            "bypass": float(self.bypass[self.layer, p]),
            "induce": float(self.induce[self.layer, p]),
            "kl": float(self.kl[self.layer, p]),
        }


#: refusal_direction's ε inside the logs of its selection KL (``kl_div_fn``).
KL_EPSILON = 1e-6


def _kl_rows(base_logits: Float[torch.Tensor, "batch vocab"], new_logits: Float[torch.Tensor, "batch vocab"]
             ) -> Float[torch.Tensor, " batch"]:
    """Per-row KL(base ‖ new) as refusal_direction's ``kl_div_fn`` computes it (float64 softmax, ε = 1e-6
    inside each log), so the KL ≤ 0.1 filter keeps exactly the candidates theirs keeps."""
    base = base_logits.to(torch.float64).softmax(-1)
    new = new_logits.to(torch.float64).softmax(-1)
    return (base * (torch.log(base + KL_EPSILON) - torch.log(new + KL_EPSILON))).sum(-1)


class CandidateScorer:
    """Scores many candidate directions with per-row hooks (rows = candidate × prompt).

    With ``share_prefix`` (the default) the token prefix every prompt shares (the chat template's
    system turn: 24 of ~40 tokens on Qwen) runs once per candidate, and each prompt continues from
    that candidate's key/value cache: the same arithmetic on fewer tokens, so the scores equal the
    plain path's to float tolerance (tested), at about half the cost.
    """

    def __init__(self, bundle: ModelBundle, harmful_ids: Sequence[Sequence[int]], harmless_ids: Sequence[Sequence[int]],
                 batch_size: int = 32, progress: bool = True, share_prefix: bool = True):
        self.bundle = bundle
        self.harmful_ids = list(harmful_ids)
        self.harmless_ids = list(harmless_ids)
        self.batch_size = batch_size
        self.progress = progress
        self.prefix = common_prefix(self.harmful_ids + self.harmless_ids) if share_prefix else []
        self._state: dict[str, Any] = {}
        layout = bundle.layout
        # Devices the hooked modules compute on: one, unless model.device_map spread the model over GPUs.
        self._devices = devices_of([*layout.blocks, *layout.attn_writers, *layout.mlp_writers])
        self.baseline_harmless_logits = self._last_logits(self.harmless_ids, [0] * len(self.harmless_ids), [])

    def _select(self, owners: Sequence[int]) -> None:
        """Point the hooks at the steering of each row's candidate for the next forward pass."""
        index = torch.tensor(list(owners), device=self.bundle.device)
        if "unit" in self._state:
            self._state["unit_rows"] = self._per_device(self._state["unit"][index])
        if "shift" in self._state:
            self._state["shift_rows"] = {li: self._per_device(s[index]) for li, s in self._state["shift"].items()}

    def _per_device(self, rows: torch.Tensor) -> dict[torch.device, torch.Tensor]:
        """``rows`` on every device a hooked module computes on, copied once per forward pass, not per hook."""
        return {device: rows.to(device) for device in self._devices}

    @torch.inference_mode()
    def _last_logits(self, rows: Sequence[Sequence[int]], owners: Sequence[int], specs: list[HookSpec]) -> torch.Tensor:
        """Last-position logits of token ``rows``; row i is steered as candidate ``owners[i]``."""
        with hooked(specs):
            if not self.prefix:
                self._select(owners)
                return forward(self.bundle, rows).logits[:, -1].float()
            candidates = sorted(set(owners))  # the prefix once per candidate, each under its own steering
            self._select(candidates)
            past = prefix_cache(self.bundle, [self.prefix] * len(candidates))
            self._select(owners)
            slot = {c: i for i, c in enumerate(candidates)}
            return continue_rows(self.bundle, rows, len(self.prefix), past, [slot[o] for o in owners])

    def _moved_to(self, module: torch.nn.Module) -> torch.device | None:
        """A pre hook's device when the model spans several (see :class:`~refusal.runtime.hooks.HookSpec`)."""
        return module_device(module) if len(self._devices) > 1 else None

    def _ablation_specs(self) -> list[HookSpec]:
        def make(device: torch.device):
            def fn(x: torch.Tensor) -> torch.Tensor:
                unit = self._state["unit_rows"][device][:, None, :]
                return x - (x * unit).sum(-1, keepdim=True) * unit
            return fn

        layout = self.bundle.layout
        specs = [HookSpec(b, make(module_device(b)), "pre", self._moved_to(b)) for b in layout.blocks]
        specs += [HookSpec(m, make(module_device(m)), "post") for m in (*layout.attn_writers, *layout.mlp_writers)]
        return specs

    def _actadd_specs(self, layers: Sequence[int]) -> list[HookSpec]:
        def make(layer: int, device: torch.device):
            def fn(x: torch.Tensor) -> torch.Tensor:
                return x + self._state["shift_rows"][layer][device][:, None, :]
            return fn

        blocks = self.bundle.layout.blocks
        return [HookSpec(blocks[li], make(li, module_device(blocks[li])), "pre", self._moved_to(blocks[li]))
                for li in sorted(set(layers))]

    def score(self, directions: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bypass, induce, KL for each candidate ``directions[i]`` (read at ``layers[i]``)."""
        dev, dt = self.bundle.device, self.bundle.dtype
        units = (directions / directions.norm(dim=-1, keepdim=True)).to(dev, dt)
        directions = directions.to(dev, dt)
        n_harm, n_safe = len(self.harmful_ids), len(self.harmless_ids)
        per_batch = max(1, self.batch_size // max(n_harm, n_safe))
        bypass, induce, kl = [], [], []
        chunks = range(0, len(units), per_batch)
        for start in tqdm(chunks, desc="scoring DiM candidates", disable=not self.progress, unit="batch"):
            idx = list(range(start, min(start + per_batch, len(units))))
            local = range(len(idx))
            # ablation at every layer: harmful rows (bypass) and harmless rows (KL), one pass
            self._state = {"unit": units[idx]}
            rows = [r for _ in idx for r in self.harmful_ids] + [r for _ in idx for r in self.harmless_ids]
            owners = [j for j in local for _ in range(n_harm)] + [j for j in local for _ in range(n_safe)]
            logits = self._last_logits(rows, owners, self._ablation_specs())
            harm_scores = refusal_score(logits[: len(idx) * n_harm], self.bundle.refusal_token_ids).view(len(idx), n_harm)
            safe_logits = logits[len(idx) * n_harm :].view(len(idx), n_safe, -1)
            bypass.append(harm_scores.mean(1))
            kl.append(torch.stack([_kl_rows(self.baseline_harmless_logits, safe_logits[j]).mean() for j in local]))
            # activation addition at each candidate's own layer on harmless rows (induce)
            shift = {li: torch.zeros(len(idx), directions.shape[-1], device=dev, dtype=dt) for li in {layers[i] for i in idx}}
            for j, i in enumerate(idx):
                shift[layers[i]][j] = directions[i]
            self._state = {"shift": shift}
            owners = [j for j in local for _ in range(n_safe)]
            logits = self._last_logits([r for _ in idx for r in self.harmless_ids], owners, self._actadd_specs(list(shift)))
            induce.append(refusal_score(logits, self.bundle.refusal_token_ids).view(len(idx), n_safe).mean(1))
        self._state = {}
        return torch.cat(bypass).cpu(), torch.cat(induce).cpu(), torch.cat(kl).cpu()

    def baselines(self) -> tuple[float, float]:
        harm = self._last_logits(self.harmful_ids, [0] * len(self.harmful_ids), [])
        return (
            float(refusal_score(harm, self.bundle.refusal_token_ids).mean()),
            float(refusal_score(self.baseline_harmless_logits, self.bundle.refusal_token_ids).mean()),
        )


def eligible_layers(n_layers: int, prune_last_fraction: float) -> list[int]:
    """Layers before the last ``prune_last_fraction`` of the model (late layers only restate the output).

    refusal_direction's ``filter_fn`` drops ``layer >= int(n_layer * (1.0 - prune_layer_percentage))``:
    the same float expression here, so 24 layers keep 0..18 and 28 keep 0..21 as theirs do.
    """
    limit = int(n_layers * (1.0 - prune_last_fraction))
    return list(range(max(1, limit)))


def select_direction(
    candidates: torch.Tensor, scorer: CandidateScorer, cfg: SelectionConfig
) -> SelectionResult:
    """Score candidates (``[n_layers, P, d]``) and pick the filtered one with the lowest bypass score."""
    n_layers, n_pos, _ = candidates.shape
    bypass = torch.full((n_layers, n_pos), math.nan, dtype=torch.float64)  # float64 like the reference's score tables
    induce = bypass.clone()
    kl = bypass.clone()
    layers = eligible_layers(n_layers, cfg.prune_last_fraction)

    base_harm, base_safe = scorer.baselines()
    min_induce = cfg.induce_threshold(base_safe)
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
            pool, _ = _filter(bypass, induce, kl, last, cfg.max_kl, min_induce)
            best = sorted(pool, key=lambda lp: float(bypass[lp]))[: cfg.shortlist]
            run([(li, p) for li, _ in best for p in range(n_pos)])
        else:
            run([(li, p) for li in layers for p in range(n_pos)])

    scored = _scored(bypass)
    pool, fallback = _filter(bypass, induce, kl, scored, cfg.max_kl, min_induce)
    notes = []
    if degenerate.any():
        notes.append(f"skipped {int(degenerate.sum())} zero-norm candidates (no harmful/harmless difference there)")
    if fallback:
        notes.append(fallback)
        warnings.warn(fallback, stacklevel=2)
    layer, pos = min(pool, key=lambda lp: float(bypass[lp]))
    decided = f"{cfg.induce_rule} rule: KL <= {cfg.max_kl} and {cfg.induce_filter(base_safe)}"
    return SelectionResult(
        layer=layer, position=pos - n_pos, bypass=bypass, induce=induce, kl=kl,
        baseline_harmful=base_harm, baseline_harmless=base_safe, passed_filters=fallback is None,
        scored=len(scored), notes=notes, decided_by=decided if fallback is None else f"{decided}; fallback: {fallback}",
    )


def _scored(bypass: torch.Tensor) -> list[tuple[int, int]]:
    return [(li, p) for li in range(bypass.shape[0]) for p in range(bypass.shape[1]) if not math.isnan(bypass[li, p])]


def picks_by_rule(result: SelectionResult, cfg: SelectionConfig) -> dict[str, str]:
    """The winner each induce rule picks among the candidates ``result`` scored (``L15P-1``), so the
    rules can be compared without rescoring (a rule's own shortlist could have scored others)."""
    n_pos = result.bypass.shape[1]
    out = {}
    for rule in INDUCE_RULES:
        threshold = replace(cfg, induce_rule=rule).induce_threshold(result.baseline_harmless)
        pool, _ = _filter(result.bypass, result.induce, result.kl, _scored(result.bypass), cfg.max_kl, threshold)
        layer, pos = min(pool, key=lambda lp: float(result.bypass[lp]))
        out[rule] = f"L{layer}P{pos - n_pos}"
    return out


def _filter(bypass, induce, kl, pairs: list[tuple[int, int]], max_kl: float,
            min_induce: float) -> tuple[list[tuple[int, int]], str | None]:
    """Candidates that pass both filters; failing that, those that pass the KL filter; failing that, all.

    A weakly refusing model (e.g. a coder model) often has no direction whose addition pushes
    harmless prompts past even odds of refusing; dropping the induce filter then still keeps the
    KL guard against directions that break the model. The second value says which fallback was taken.
    """
    both = [lp for lp in pairs if kl[lp] <= max_kl and induce[lp] >= min_induce]  # refusal_direction: < is dropped
    if both:
        return both, None
    kl_only = [lp for lp in pairs if kl[lp] <= max_kl]
    if kl_only:
        return kl_only, (
            f"no candidate passed both filters (KL <= {max_kl}, induce >= {min_induce:.2f}); chose among the "
            f"{len(kl_only)} that pass the KL filter — no candidate's actadd raised harmless refusal past the induce threshold"
        )
    return pairs, (
        f"no candidate passed the filters (KL <= {max_kl}, induce >= {min_induce:.2f}); "
        "took the lowest bypass score regardless — the model may barely refuse"
    )
