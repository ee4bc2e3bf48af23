"""Directional ablation baked into the weights: a normal checkpoint that needs no hooks.

Every matrix that writes into the residual stream (token embeddings, attention output and MLP
down projections, and their biases) is replaced by (I − r̂r̂ᵀ)W, so no layer can write along r̂.
The unembedding is untied first when it shares the embedding matrix: it reads the (normalised)
residual and must stay as it was.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from refusal.errors import ConfigError
from refusal.models.architecture import residual_layout
from refusal.models.bundle import ModelBundle


def _writer_linear(module: nn.Module) -> nn.Linear:
    for name in ("o_proj", "down_proj", "dense", "out_proj"):
        if isinstance(getattr(module, name, None), nn.Linear):
            return getattr(module, name)
    raise ConfigError(f"cannot find the output projection of {type(module).__name__}")


@torch.no_grad()
def orthogonalize_(model: nn.Module, unit: torch.Tensor) -> nn.Module:
    """In place: remove ``unit`` from everything that writes the residual stream of ``model``."""
    layout = residual_layout(model)
    if layout.post_sublayer_norms:
        raise ConfigError(
            f"{layout.model_type} normalises each sub-layer output before adding it to the residual, so weight "
            "orthogonalisation cannot be exact; use the hook-based intervention=dim_ablation instead"
        )
    unit = unit.to(device=layout.embedding.weight.device, dtype=torch.float64)  # exact to the weights' precision
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is layout.embedding.weight:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False

    def here(weight: torch.Tensor) -> torch.Tensor:  # a model.device_map model keeps its weights on several GPUs
        return unit if unit.device == weight.device else unit.to(weight.device)

    def project_rows(weight: torch.Tensor) -> None:  # rows live in the residual space: [*, d]
        w, u = weight.double(), here(weight)
        weight.copy_(w - torch.outer(w @ u, u))

    def project_cols(weight: torch.Tensor) -> None:  # output dim is the residual: [d, *]
        w, u = weight.double(), here(weight)
        weight.copy_(w - torch.outer(u, u @ w))

    project_rows(layout.embedding.weight)
    for writer in (*layout.attn_writers, *layout.mlp_writers):
        linear = _writer_linear(writer)
        project_cols(linear.weight)
        if linear.bias is not None:
            b, u = linear.bias.double(), here(linear.bias)
            linear.bias.copy_(b - (b @ u) * u)
    return model


def export_orthogonalized(bundle: ModelBundle, unit: torch.Tensor, out_dir: str | Path) -> Path:
    """Save an orthogonalised copy of ``bundle``'s model (plus tokenizer) with ``save_pretrained``."""
    out_dir = Path(out_dir)
    model = orthogonalize_(copy.deepcopy(bundle.model), unit)
    model.save_pretrained(out_dir)
    bundle.tokenizer.save_pretrained(out_dir)
    return out_dir
