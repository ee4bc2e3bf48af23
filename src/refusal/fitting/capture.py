"""How much of the DiM mean difference the INLP subspace holds, and how each INLP direction aligns with it.

Capture explains where INLP's edits land on the DiM axis. With Δ = μ_harmful − μ_harmless and
orthonormal rows W_k, capture(k) = |W_k Δ|² / |Δ|² is the share of Δ inside span(W_k). Nullspace
projection about the midpoint removes that share of each harmful point's offset along Δ, so for
symmetric clusters it lands at t ≈ capture/2 on the harmful → harmless axis; the flip reflects it,
landing at t ≈ capture. A subspace that captures little of Δ cannot move activations far along it.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def capture_curve(directions: Float[Tensor, "k d_model"], delta: Float[Tensor, " d_model"]) -> Float[Tensor, " k"]:
    """capture(k) = |W_k Δ|² / |Δ|² for k = 1..K (non-decreasing, 1 when Δ lies in the span)."""
    W, d = directions.to(torch.float64), delta.to(torch.float64)
    return ((W @ d) ** 2).cumsum(0) / d.dot(d)


def direction_cosines(directions: Float[Tensor, "k d_model"], delta: Float[Tensor, " d_model"]) -> Float[Tensor, " k"]:
    """Cosine of each INLP direction with r̂ = Δ/|Δ| (signed: INLP rows point towards harmful, like r)."""
    W, d = directions.to(torch.float64), delta.to(torch.float64)
    return (W @ d) / (W.norm(dim=1) * d.norm())
