"""COSMIC direction and layer selection (Siu et al. 2025, "COSMIC: Generalized Refusal Direction
Identification in LLM Activations", arXiv 2506.00085; their ``select_direction_cosmic.py`` with
``affine_steering=false``, the directional ablation our interventions use).

It picks among the same DiM candidates (every layer and post-instruction position) without reading
whether the model refuses: the *read layers* are the share ``fraction`` of layers whose harmful and
harmless mean last-token activations (block outputs, from the fit split) have the lowest cosine
similarity. On the val prompts, the unsteered harmful and harmless activations at those layers (last
token, averaged over prompts and read layers, normalised) are the two references. Each candidate is
scored by
- *refusal similarity*: cosine of the harmful prompts' activations with the candidate ablated
  (every layer, as DiM ablation) with the harmless reference (refusal removed: looks harmless), and
- *steering similarity*: cosine of the harmless prompts' activations with the candidate added at its
  layer with the harmful reference (refusal induced: looks harmful),
and the candidate with the highest sum wins among those whose ablation keeps the harmless next-token
KL ≤ ``max_kl`` and that lie before the last ``prune_last_fraction`` of layers (Arditi et al.'s
filters, which COSMIC keeps). Left out: their extra rule that skips last-position candidates past the
median layer where the scores peak (a heuristic the paper does not describe).

Scoring is one forward pass per candidate batch (qwen15 on 2 cores: 34 min for 140 candidates), so with a
``progress`` store the score tables are kept after every pass and a stopped selection goes on from there.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from refusal.errors import FitError
from refusal.fitting.dim import _kl_rows, eligible_layers
from refusal.fitting.steering import Steerable

log = logging.getLogger(__name__)
TABLES = ("refusal", "steering", "kl")


@dataclass
class CosmicConfig:
    fraction: float = 0.1  # share of layers read (at least one): those whose class means are least alike
    max_kl: float = 0.1
    prune_last_fraction: float = 0.2
    n_prompts: int | None = None  # val prompts per class (None: all)
    batch_size: int = 32  # rows (candidates x prompts) per forward pass

    @classmethod
    def from_layer_cfg(cls, layer_cfg: Any) -> CosmicConfig:
        """``layer=cosmic``'s settings (their types and ranges: :class:`refusal.schema.CosmicLayerSchema`)."""
        return cls(**{k: layer_cfg[k] for k in layer_cfg if k in cls.__dataclass_fields__})


@dataclass
class CosmicResult:
    layer: int
    position: int  # negative offset into the post-instruction tokens
    read_layers: list[int]
    refusal_similarity: Tensor  # [n_layers, P], nan where not scored
    steering_similarity: Tensor
    kl: Tensor
    notes: list[str] = field(default_factory=list)

    def winner(self) -> dict[str, float]:
        p = self.position + self.kl.shape[1]
        return {"refusal_similarity": float(self.refusal_similarity[self.layer, p]),
                "steering_similarity": float(self.steering_similarity[self.layer, p]), "kl": float(self.kl[self.layer, p])}


class CosmicProgress(Protocol):
    """Where ``select_cosmic`` keeps its score tables after every pass (``refusal.fits``: a checksummed artifact)."""

    def load(self) -> dict[str, Tensor] | None: ...

    def save(self, tables: dict[str, Tensor]) -> None: ...


def low_similarity_layers(harmful_mean: Float[Tensor, "n_layers d_model"], harmless_mean: Float[Tensor, "n_layers d_model"],
                          fraction: float) -> list[int]:
    """The ``max(1, int(fraction·n_layers))`` layers whose class means have the lowest cosine, increasing."""
    cos = torch.nn.functional.cosine_similarity(harmful_mean.double(), harmless_mean.double(), dim=-1)
    n = max(1, int(fraction * len(cos)))
    return sorted(torch.argsort(cos)[:n].tolist())


def reference(residuals: Float[Tensor, "m n reads d_model"]) -> Float[Tensor, "m d_model"]:
    """Each copy's activations averaged over prompts and read layers, normalised (their ``get_baseline_vector``)."""
    mean = residuals.mean(dim=(1, 2))
    return mean / (mean.norm(dim=-1, keepdim=True) + 1e-8)


@torch.no_grad()
def select_cosmic(candidates: Float[Tensor, "n_layers n_pos d_model"], model: Steerable, read_layers: list[int],
                  cfg: CosmicConfig, n_prompts: int, progress: CosmicProgress | None = None) -> CosmicResult:
    """Score every eligible candidate (``model`` holds the val prompts) and pick COSMIC's winner; with ``progress``,
    the scores of an earlier, stopped selection are kept and only the rest are computed."""
    n_layers, n_pos, _ = candidates.shape
    scored = [(li, p) for li in eligible_layers(n_layers, cfg.prune_last_fraction) for p in range(n_pos)
              if float(candidates[li, p].norm()) > 1e-6 * float(candidates.norm(dim=-1).max())]
    if not scored:
        raise FitError(f"COSMIC: no candidate to score (the {n_layers} layers before the last prune_last_fraction="
                       f"{cfg.prune_last_fraction} hold only zero-norm mean differences); lower layer.prune_last_fraction")
    ref_harm = reference(model.run("harmful", read=read_layers).residuals)[0]
    plain = model.run("harmless", read=read_layers)
    ref_safe, base_logits = reference(plain.residuals)[0], plain.logits[0]
    tables = progress.load() if progress is not None else None
    if tables is None or any(tables[name].shape != (n_layers, n_pos) for name in TABLES):
        tables = {name: torch.full((n_layers, n_pos), math.nan, dtype=torch.float64) for name in TABLES}
    elif done := sum(not math.isnan(float(tables["kl"][lp])) for lp in scored):
        log.info("COSMIC resumed with %d/%d candidates' ablations scored", done, len(scored))

    def keep() -> None:
        if progress is not None:
            progress.save(tables)

    to_ablate = [lp for lp in scored if math.isnan(float(tables["kl"][lp]))]
    per_pass = max(1, cfg.batch_size // n_prompts)
    for start in range(0, len(to_ablate), per_pass):
        chunk = to_ablate[start:start + per_pass]
        dirs = torch.stack([candidates[li, p] for li, p in chunk]).float()
        ablated_harm = model.run("harmful", ablate=dirs, read=read_layers)
        ablated_safe = model.run("harmless", ablate=dirs)
        for j, (li, p) in enumerate(chunk):
            tables["refusal"][li, p] = float(reference(ablated_harm.residuals[j:j + 1])[0] @ ref_safe)
            tables["kl"][li, p] = float(_kl_rows(base_logits, ablated_safe.logits[j]).mean())
        keep()
    for li in sorted({li for li, _ in scored}):  # addition acts at the candidate's own layer: one pass per layer
        positions = [p for lj, p in scored if lj == li and math.isnan(float(tables["steering"][lj, p]))]
        if not positions:
            continue
        added = model.run("harmless", add=candidates[li, positions].float(), add_layer=li, read=read_layers)
        for j, p in enumerate(positions):
            tables["steering"][li, p] = float(reference(added.residuals[j:j + 1])[0] @ ref_harm)
        keep()
    pool = [lp for lp in scored if tables["kl"][lp] <= cfg.max_kl]
    notes = []
    if not pool:
        notes.append(f"no candidate kept the harmless next-token KL <= {cfg.max_kl}; chose among all {len(scored)}")
        warnings.warn(notes[-1], stacklevel=2)
        pool = scored
    layer, pos = max(pool, key=lambda lp: float(tables["refusal"][lp] + tables["steering"][lp]))
    return CosmicResult(layer, pos - n_pos, read_layers, tables["refusal"], tables["steering"], tables["kl"], notes)
