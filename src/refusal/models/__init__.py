"""Model loading: packaged GGUF, local/Hub checkpoints and the in-process tiny model."""

from refusal.models.architecture import SUPPORTED_ARCHITECTURES, ResidualLayout, decoder_of, residual_layout
from refusal.models.bundle import Batch, ModelBundle
from refusal.models.chat import KNOWN_TEMPLATES, ChatFormat
from refusal.models.loader import SOURCES, load_model

__all__ = [
    "SOURCES",
    "SUPPORTED_ARCHITECTURES",
    "KNOWN_TEMPLATES",
    "Batch",
    "ChatFormat",
    "ModelBundle",
    "ResidualLayout",
    "decoder_of",
    "load_model",
    "residual_layout",
]
