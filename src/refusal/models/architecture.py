"""Where the residual stream lives in each supported architecture.

Hooks and weight export need the same handful of modules: the decoder blocks (whose inputs
are the residual stream), the final norm (whose input is the last residual), the embedding,
and the modules whose *outputs are added to the residual* after attention and after the MLP.
For llama/qwen2/gemma those are ``self_attn`` and ``mlp``; gemma2/gemma3 normalise each
sub-layer output before adding it, so the writers are their post-sub-layer norms.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from refusal.errors import ConfigError

# model_type -> (attention writer attribute, mlp writer attribute, post-norms present)
_WRITERS: dict[str, tuple[str, str, bool]] = {
    "llama": ("self_attn", "mlp", False),
    "mistral": ("self_attn", "mlp", False),
    "qwen2": ("self_attn", "mlp", False),
    "qwen3": ("self_attn", "mlp", False),
    "gemma": ("self_attn", "mlp", False),
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm", True),
    "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm", True),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm", True),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_WRITERS))


@dataclass(frozen=True)
class ResidualLayout:
    """The modules that read and write the residual stream of one decoder-only model."""

    model_type: str
    blocks: list[nn.Module]
    final_norm: nn.Module
    embedding: nn.Embedding
    attn_writers: list[nn.Module]
    mlp_writers: list[nn.Module]
    lm_head: nn.Module
    post_sublayer_norms: bool

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def _decoder(model: nn.Module) -> nn.Module:
    """The inner decoder (``model.model`` for *ForCausalLM; multimodal wrappers nest it once more)."""
    inner = getattr(model, "model", model)
    if hasattr(inner, "language_model"):
        inner = inner.language_model
    if not hasattr(inner, "layers"):
        raise ConfigError(f"cannot find decoder layers in {type(model).__name__}; supported: {SUPPORTED_ARCHITECTURES}")
    return inner


def residual_layout(model: nn.Module) -> ResidualLayout:
    model_type = model.config.model_type
    if model_type not in _WRITERS:
        raise ConfigError(
            f"architecture {model_type!r} is not supported yet; supported: {', '.join(SUPPORTED_ARCHITECTURES)}. "
            "Add it to refusal.models.architecture._WRITERS."
        )
    attn_name, mlp_name, post_norms = _WRITERS[model_type]
    decoder = _decoder(model)
    blocks = list(decoder.layers)
    return ResidualLayout(
        model_type=model_type,
        blocks=blocks,
        final_norm=decoder.norm,
        embedding=decoder.embed_tokens,
        attn_writers=[getattr(b, attn_name) for b in blocks],
        mlp_writers=[getattr(b, mlp_name) for b in blocks],
        lm_head=model.get_output_embeddings(),
        post_sublayer_norms=post_norms,
    )


def decoder_of(model: nn.Module) -> nn.Module:
    """The base decoder, run directly when logits are not needed (skips the vocab projection)."""
    return _decoder(model)
