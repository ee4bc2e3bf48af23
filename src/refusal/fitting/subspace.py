"""Several refusal directions as one orthonormal basis, and the check that it has the rank asked for.

The multi-direction basis is nested on DiM: its first row is r̂ (the DiM direction), the next k−1 are
the leading principal components of the per-prompt differences (each harmful activation minus the
harmless mean) after r̂ is projected out of them. Why this and not per-category DiM directions: the
fit splits carry no category (only the held-out benchmarks do), and nesting makes k=1 exactly DiM
ablation, so each added row answers the study's question "does a second direction add anything once
the first is removed?". The differences are taken about the harmless mean, not about their own
mean: after r̂ is removed their mean is zero, so these are the directions along which harmful
prompts still differ from the harmless centre, not generic harmful-prompt variance.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from refusal.errors import FitError

#: A basis row whose length left after removing the earlier rows is below this share of its own
#: length adds no new direction.
RANK_TOLERANCE = 1e-5


def orthonormal_basis(vectors: Float[Tensor, "k d_model"], what: str, fix: str) -> Float[Tensor, "k d_model"]:
    """Gram–Schmidt (QR) of ``vectors``' rows, in their order; a row in the span of the earlier ones is a
    :class:`FitError` naming ``what``, the numbers and ``fix``."""
    v = vectors.detach().to(torch.float64)
    q, r = torch.linalg.qr(v.T)
    left = r.diagonal().abs() / v.norm(dim=1).clamp_min(1e-30)  # each row's share outside the earlier rows' span
    rank = int((left > RANK_TOLERANCE).sum())
    if rank < v.shape[0]:
        raise FitError(f"{what}: the {v.shape[0]} directions span only rank {rank} (share of each row's length "
                       f"outside the earlier rows' span: {[round(float(x), 6) for x in left]}; below "
                       f"{RANK_TOLERANCE:g} counts as none); {fix}")
    return (q.T * torch.sign(r.diagonal())[:, None]).to(vectors.dtype)  # row i keeps vectors[i]'s orientation


def difference_components(
    harmful: Float[Tensor, "n d_model"], harmless_mean: Float[Tensor, " d_model"], k: int
) -> tuple[Float[Tensor, "k d_model"], Float[Tensor, " k"]]:
    """The nested multi-direction basis (rows) and the share of the per-prompt differences' squared
    length each row explains (the first: DiM's)."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    diffs = (harmful - harmless_mean).to(torch.float64)
    r = diffs.mean(0)
    first = r / r.norm().clamp_min(1e-30)
    rest = diffs - (diffs @ first)[:, None] * first
    _, s, vh = torch.linalg.svd(rest, full_matrices=False)
    fix = (f"lower intervention.k (the differences of {len(harmful)} prompts span at most {len(s)} directions "
           "beyond DiM's) or fit on more prompts")
    along = (diffs @ first).norm()  # the first row's share, the scale the others are measured against
    kept = s[: k - 1] / along.clamp_min(1e-30)
    if k - 1 > len(s) or bool((kept <= RANK_TOLERANCE).any()):
        raise FitError(f"multi-direction ablation: k={k} needs {k - 1} directions beyond DiM's, but the per-prompt "
                       f"differences have only {int((s / along.clamp_min(1e-30) > RANK_TOLERANCE).sum())} (singular "
                       f"values relative to DiM's: {[round(float(x), 6) for x in s[: k - 1] / along.clamp_min(1e-30)]}, "
                       f"below {RANK_TOLERANCE:g} counts as none); {fix}")
    basis = orthonormal_basis(torch.cat([first[None], vh[: k - 1]]), f"multi-direction basis (k={k})", fix)
    total = diffs.pow(2).sum()
    explained = torch.cat([(diffs @ first).pow(2).sum()[None], s[: k - 1].pow(2)]) / total
    return basis.to(harmful.dtype), explained.to(torch.float32)
