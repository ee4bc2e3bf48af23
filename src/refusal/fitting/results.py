"""What fitting produces, as the interventions read it: the DiM direction and the bundle of every fit a run
made (the DiM class means, INLP and LEACE results own their save/load in :mod:`refusal.fitting.inlp` and :mod:`refusal.fitting.leace`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from refusal.artifacts import load_artifact, save_artifact
from refusal.fitting.inlp import INLPResult
from refusal.fitting.leace import LEACEResult


@dataclass(frozen=True)
class DiMDirection:
    """A difference-in-means refusal direction r (unnormalised) read at one layer and position."""

    direction: Float[torch.Tensor, " d_model"]
    layer: int
    position: int  # negative offset into the post-instruction tokens

    @property
    def unit(self) -> Float[torch.Tensor, " d_model"]:
        return self.direction / self.direction.norm()

    def save(self, stem: Path, meta: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> None:
        """``<stem>.safetensors`` + ``.json``: the direction, where it was read, and what chose it (``extra``:
        the candidates and selection scores; ``meta``: the model, data and settings that made it)."""
        save_artifact(stem, {**(extra or {}), "direction": self.direction},
                      {**meta, "layer": self.layer, "position": self.position})

    @classmethod
    def load(cls, stem: Path, expect: dict[str, Any]) -> DiMDirection:
        """The direction saved at ``stem``; an artifact made for other than ``expect`` is refused."""
        tensors, meta = load_artifact(stem, expect=expect)
        return cls(tensors["direction"], int(meta["layer"]), int(meta["position"]))


@dataclass(frozen=True)
class DiMMeans:
    """The harmful and harmless mean residuals at the DiM position, at every site: index l < n_layers is
    block l's input, index n_layers the last block's output (so index j is hidden state j, as heretic
    counts). Their differences are the per-layer DiM directions; the harmless means are what projected
    ablation projects out."""

    harmful: Float[torch.Tensor, "sites d_model"]
    harmless: Float[torch.Tensor, "sites d_model"]
    position: int

    @property
    def directions(self) -> Float[torch.Tensor, "sites d_model"]:
        return self.harmful - self.harmless


@dataclass
class Fitted:
    """Everything fitted that interventions may need; ``None`` where not fitted.

    ``inlp`` is the INLP fit at the DiM layer; ``inlp_by_layer`` holds one fit per layer when
    ``fit.inlp.per_layer=true`` (each layer's own centre, signs and directions). ``dim_means``: the
    class means behind the DiM direction, at every layer (needs "dim_means"). ``extra``: an intervention's
    own fit (``Intervention.fit_extra``), by its name.
    """

    dim: DiMDirection | None = None
    dim_means: DiMMeans | None = None
    inlp: INLPResult | None = None
    inlp_layer: int | None = None
    inlp_by_layer: dict[int, INLPResult] = field(default_factory=dict)
    leace: LEACEResult | None = None
    extra: dict[str, Any] = field(default_factory=dict)
