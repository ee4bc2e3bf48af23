"""LEACE (Belrose et al. 2023): the closed-form least-squares eraser of a linear concept.

Fitted with EleutherAI's ``concept-erasure`` package (``LeaceFitter``), on the same activations as
INLP (DiM layer, post-instruction positions). For a two-class concept the eraser is a rank-one
oblique projection ``x ↦ x − L R (x − b)`` with ``L`` [d, 1], ``R`` [1, d] and ``R L = 1``; after it the
class-conditional means coincide, so no linear classifier beats chance. ``L R`` is stored as the two
factors, the class means beside them, as safetensors + JSON like every artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from refusal.artifacts import load_artifact, save_artifact
from refusal.errors import ConfigError, CorruptArtifactError, DataError
from refusal.fitting.threads import FIT_THREADS, fixed_threads

INSTALL_HINT = "pip install -e '.[leace]' (or pip install concept-erasure==0.2.4)"


@dataclass
class LEACEResult:
    """The eraser's factors (x ↦ x − L R (x − b)) and the class means it was fitted on."""

    proj_left: Float[Tensor, "d_model k"]
    proj_right: Float[Tensor, "k d_model"]
    bias: Float[Tensor, " d_model"]
    mean_harmful: Float[Tensor, " d_model"]
    mean_harmless: Float[Tensor, " d_model"]

    @property
    def d_model(self) -> int:
        return int(self.bias.shape[0])

    @property
    def rank(self) -> int:
        return int(self.proj_right.shape[0])

    @property
    def midpoint(self) -> Float[Tensor, " d_model"]:
        return (self.mean_harmful + self.mean_harmless) / 2

    def erase(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        return x - ((x - self.bias) @ self.proj_right.T) @ self.proj_left.T

    def to_tensors(self) -> dict[str, Tensor]:
        return {"proj_left": self.proj_left, "proj_right": self.proj_right, "bias": self.bias,
                "mean_harmful": self.mean_harmful, "mean_harmless": self.mean_harmless}

    def save(self, stem: str | Path, meta: Mapping[str, Any]) -> None:
        save_artifact(stem, self.to_tensors(), {"method": "leace", "d_model": self.d_model, "rank": self.rank, **meta})

    @classmethod
    def load(cls, stem: str | Path, expect: Mapping[str, Any] | None = None) -> LEACEResult:
        tensors, meta = load_artifact(stem, expect)
        names = ("proj_left", "proj_right", "bias", "mean_harmful", "mean_harmless")
        if meta.get("method") != "leace" or any(name not in tensors for name in names):
            raise CorruptArtifactError(f"{stem} is not a LEACE artifact (method={meta.get('method')!r})", "refit it")
        result = cls(*(tensors[name] for name in names))
        d = result.d_model
        if result.proj_left.shape != (d, result.rank) or result.proj_right.shape[1] != d:
            raise CorruptArtifactError(f"LEACE artifact {stem} has inconsistent shapes", "refit it")
        return result


def fit_leace(X: Float[Tensor, "n d_model"], y: Int[Tensor, " n"]) -> LEACEResult:
    """Fit the LEACE eraser of the harmful (1) / harmless (0) label on ``X`` (float64 internally).

    ``constrain_cov_trace`` is off so that the eraser is the exact LEACE projection (R L = 1, equal
    class means afterwards); the package's default would mix in an orthogonal projection. Runs on
    :data:`~refusal.fitting.threads.FIT_THREADS` CPU threads (the covariance product and ``eigh``
    are MKL's, reproducible only for a fixed count), so the artifact does not depend on the caller's.
    """
    try:
        from concept_erasure import LeaceFitter
    except ImportError as err:
        raise ConfigError(f"LEACE needs the concept-erasure package: {INSTALL_HINT}") from err
    if X.ndim != 2 or len(X) != len(y) or int(y.sum()) in (0, len(y)):
        raise DataError(f"LEACE needs [n, d] activations with both classes, got {tuple(X.shape)} and {int(y.sum())} harmful")
    with fixed_threads(FIT_THREADS):
        X64 = X.detach().to(torch.float64)
        eraser = LeaceFitter.fit(X64, y.to(torch.float64)[:, None], constrain_cov_trace=False).eraser
        mask = y.bool()
        return LEACEResult(
            proj_left=eraser.proj_left.to(torch.float32).contiguous(),
            proj_right=eraser.proj_right.to(torch.float32).contiguous(),
            bias=eraser.bias.to(torch.float32).contiguous(),
            mean_harmful=X64[mask].mean(0).to(torch.float32),
            mean_harmless=X64[~mask].mean(0).to(torch.float32),
        )
