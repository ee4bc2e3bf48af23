"""The contract every intervention follows.

An intervention is built from its Hydra config plus the fitted artifacts it declares in
``needs``; it names the modules it hooks and the tensor function it applies there. Applying it
is a context manager: hooks on enter, all removed on exit, even on error. Any subclass that
sets ``name`` registers itself, so a plugin file only has to define the class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from refusal.errors import ConfigError
from refusal.hooks import HookSpec, hooked
from refusal.models.bundle import ModelBundle


@dataclass(frozen=True)
class DiMDirection:
    """A difference-in-means refusal direction r (unnormalised) read at one layer and position."""

    direction: torch.Tensor  # [d_model]
    layer: int
    position: int  # negative offset into the post-instruction tokens

    @property
    def unit(self) -> torch.Tensor:
        return self.direction / self.direction.norm()


@dataclass
class Fitted:
    """Everything fitted that interventions may need; ``None`` where not fitted."""

    dim: DiMDirection | None = None
    inlp: Any = None  # refusal.fitting.inlp.INLPResult
    inlp_layer: int | None = None


class Intervention(ABC):
    """Base class. Subclasses set ``name``, ``description``, ``needs`` and implement :meth:`hook_specs`."""

    name: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: Mapping[str, Any], fitted: Fitted):
        self.cfg = dict(cfg)
        self.fitted = fitted
        missing = [need for need in sorted(self.needs) if getattr(fitted, need, None) is None]
        if missing:
            raise ConfigError(f"intervention {self.name!r} needs fitted {missing}; run train.py or let evaluate.py fit them")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            from refusal.interventions.registry import register

            register(cls)

    # -- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        """The hooks that implement this intervention on ``bundle``'s model."""

    @property
    def layer(self) -> int | None:
        """The layer whose input this intervention edits (for geometry), or None if everywhere/nowhere."""
        return None

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The edit applied to residual activations at :attr:`layer` (identity by default)."""
        return x

    def params(self) -> dict[str, Any]:
        """Parameters worth recording in results (defaults to the config minus its name)."""
        return {k: v for k, v in self.cfg.items() if k != "name"}

    # -- shared machinery ---------------------------------------------------------------------
    @contextmanager
    def apply(self, bundle: ModelBundle) -> Iterator[None]:
        """Hooks on, yield, hooks off (always)."""
        with hooked(self.hook_specs(bundle)):
            yield

    def _tensor(self, value: torch.Tensor, bundle: ModelBundle) -> torch.Tensor:
        """Move a fitted tensor to the model once, so hooks never convert per call."""
        if value.shape[-1] != bundle.d_model:
            raise ConfigError(
                f"{self.name}: fitted tensor has d_model={value.shape[-1]} but {bundle.name} has {bundle.d_model}; "
                "the artifact belongs to another model, refit it"
            )
        return value.to(device=bundle.device, dtype=bundle.dtype)

    def _check_layer(self, layer: int, bundle: ModelBundle) -> int:
        if not 0 <= layer < bundle.n_layers:
            raise ConfigError(f"{self.name}: layer {layer} is out of range for {bundle.name} (0..{bundle.n_layers - 1})")
        return layer
