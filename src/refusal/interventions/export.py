"""Directional ablation baked into the weights: a normal checkpoint that needs no hooks.

Every matrix that writes into the residual stream (token embeddings, attention output and MLP
down projections, and their biases) is replaced by (I − w·uuᵀ)W as an
:class:`~refusal.interventions.weighted.AblationPlan` says (Arditi et al.'s orthogonalisation:
u = r̂ and w = 1 everywhere), with the columns (rows) rescaled where the plan preserves norms. The
unembedding is untied first when it shares the embedding matrix: it reads the (normalised)
residual and must stay as it was.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from jaxtyping import Float
from torch import nn

from refusal.errors import ConfigError
from refusal.interventions.weighted import (
    AblationPlan,
    WriteEdit,
    column_scales,
    norm_ratio,
    row_scales,
    writer_linear,
)
from refusal.models.architecture import residual_layout
from refusal.models.bundle import ModelBundle


def uniform_plan(unit: torch.Tensor, n_layers: int) -> AblationPlan:
    """Arditi et al.'s orthogonalisation: ``unit`` removed from the embedding and every write."""
    edit = WriteEdit(unit)
    return AblationPlan(edit, {(layer, part): edit for layer in range(n_layers) for part in ("attn", "mlp")})


@torch.no_grad()
def apply_plan_(model: nn.Module, plan: AblationPlan) -> nn.Module:
    """In place: edit every residual write of ``model`` that ``plan`` names (in float64, stored in the weights' dtype)."""
    layout = residual_layout(model)
    if layout.post_sublayer_norms:
        raise ConfigError(
            f"{layout.model_type} normalises each sub-layer output before adding it to the residual, so weight "
            "orthogonalisation cannot be exact; use the hook-based intervention instead"
        )
    if plan.embedding is not None and model.get_output_embeddings() is not None \
            and model.get_output_embeddings().weight is layout.embedding.weight:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False

    def unit_for(edit: WriteEdit, weight: torch.Tensor) -> torch.Tensor:  # a device_map model keeps weights on several GPUs
        return edit.unit.to(device=weight.device, dtype=torch.float64)  # exact to the weights' precision

    if plan.embedding is not None:  # rows live in the residual space: [vocab, d]
        edit, weight = plan.embedding, layout.embedding.weight
        w, u = weight.double(), unit_for(plan.embedding, weight)
        edited = w - edit.weight * torch.outer(w @ u, u)
        if edit.preserve == "rows":
            raise ConfigError("row norm preservation (heretic's) edits attention/MLP writes only, not the embedding")
        if edit.preserve == "columns":
            edited = edited * norm_ratio(w, edited, dim=1).unsqueeze(1)
        weight.copy_(edited)
    for (layer, part), edit in plan.writes.items():  # output dim is the residual: [d, *]
        linear = writer_linear((layout.attn_writers if part == "attn" else layout.mlp_writers)[layer])
        w, u = linear.weight.double(), unit_for(edit, linear.weight)
        if edit.preserve == "rows":
            norms, gains = row_scales(linear.weight, edit.unit, edit.weight)
            normalised = w / norms.unsqueeze(1)
            edited = gains.unsqueeze(1) * (normalised - edit.weight * torch.outer(u, u @ normalised))
        else:
            edited = w - edit.weight * torch.outer(u, u @ w)
        if edit.preserve == "columns":
            edited = edited * column_scales(linear.weight, edit.unit, edit.weight)
        linear.weight.copy_(edited)
        if linear.bias is not None:
            b = linear.bias.double()
            linear.bias.copy_(b - edit.weight * (b @ u) * u)
    return model


def orthogonalize_(model: nn.Module, unit: torch.Tensor) -> nn.Module:
    """In place: remove ``unit`` from everything that writes the residual stream of ``model``."""
    return apply_plan_(model, uniform_plan(unit, len(residual_layout(model).blocks)))


def export_plan(bundle: ModelBundle, plan: AblationPlan, out_dir: str | Path) -> Path:
    """Save a copy of ``bundle``'s model with ``plan`` baked in (plus tokenizer) with ``save_pretrained``."""
    return _save(apply_plan_(copy.deepcopy(bundle.model), plan), bundle, Path(out_dir))


def export_subspace(bundle: ModelBundle, basis: Float[torch.Tensor, "k d_model"], out_dir: str | Path) -> Path:
    """Save a copy with the span of ``basis`` (orthonormal rows) removed from every residual write: x − QᵀQx, the
    multi-direction and RDO ablations. Each row is removed in turn, since (I − q₂q₂ᵀ)(I − q₁q₁ᵀ) = I − QᵀQ when
    the rows are orthonormal."""
    off = float((basis.double() @ basis.double().T - torch.eye(len(basis), dtype=torch.float64)).abs().max())
    if off > 1e-4:
        raise ConfigError(f"the {len(basis)} directions to export are not orthonormal (Gram matrix off the identity by "
                          f"{off:.2g}): removing them one by one would not remove their span; orthonormalise the basis first")
    model = copy.deepcopy(bundle.model)
    for row in basis:
        apply_plan_(model, uniform_plan(row, bundle.n_layers))
    return _save(model, bundle, Path(out_dir))


def _save(model: nn.Module, bundle: ModelBundle, out_dir: Path) -> Path:
    model.save_pretrained(out_dir)
    bundle.tokenizer.save_pretrained(out_dir)
    return out_dir


def export_orthogonalized(bundle: ModelBundle, unit: torch.Tensor, out_dir: str | Path) -> Path:
    """Save an orthogonalised copy of ``bundle``'s model (plus tokenizer) with ``save_pretrained``."""
    return export_plan(bundle, uniform_plan(unit, bundle.n_layers), out_dir)
