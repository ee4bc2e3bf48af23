"""Where do steered harmful activations land, and how separable are the classes per layer?

The study's claim is geometric: INLP nullspace projection collapses harmful activations *between*
the harmful and harmless clusters, counterfactual flipping moves them *into* the harmless cluster,
DiM ablation / actadd do something else. These functions turn activations (plain tensors, no
model) into the numbers that test that claim.

Conventions
-----------
* The **DiM axis** runs from the harmful centroid ``mu_harmful`` to the harmless centroid
  ``mu_harmless``. A point's axis coordinate is
  ``t = (x - mu_harmful) . (mu_harmless - mu_harmful) / |mu_harmless - mu_harmful|^2``, so
  ``t = 0`` at the harmful mean, ``t = 1`` at the harmless mean, ``t = 0.5`` on the midpoint
  hyperplane. Distances are reported in units of the centroid distance for the same reason: the
  numbers compare across layers and models whose activation norms differ by orders of magnitude.
* The refusal direction points from harmless to harmful (``mu_harmful - mu_harmless``), the DiM
  convention, so ``cos_diff_dir`` is +1 for a perfectly recovered direction.
* Probe labels: ``y = 1`` is harmful, ``y = 0`` harmless.

Landing labels (:data:`LANDING_THRESHOLDS`)
-------------------------------------------
The label describes the *mean* transformed harmful activation, with axis coordinate ``t``:

* ``stays``    -- ``t < 0.25``: still in the harmful cluster's quarter of the axis (this includes
  ``t < 0``, pushed further away from harmless).
* ``opposite`` -- ``t > 0.75`` *and* the probe's mean p(harmful) is below ``0.5`` (when a probe is
  given): it crossed into the harmless cluster and a classifier trained on unsteered data agrees.
* ``between``  -- everything else: the middle half of the axis, or past 0.75 while the probe still
  calls it harmful (the point moved along the axis but not into the harmless distribution).

The cut-offs are a quarter of the centroid distance from each mean: wide enough that sampling
noise in the centroids does not flip a label, narrow enough that the midpoint (``t = 0.5``) is
unambiguous. Pass another :class:`LandingThresholds` to change them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from refusal.errors import DataError
from refusal.stats.paired import bootstrap_interval

#: Most points fed to ``silhouette_score`` per layer; it is O(n^2), so larger sets are subsampled.
SILHOUETTE_MAX_POINTS = 512
#: Seed of the silhouette subsample, fixed so the layer table is reproducible.
SILHOUETTE_SEED = 0


@dataclass(frozen=True)
class LandingThresholds:
    """Cut-offs for the landing label; see the module docstring for what each means."""

    stays_below: float = 0.25
    opposite_above: float = 0.75
    probe_harmful_below: float = 0.5

    def __post_init__(self) -> None:
        if not self.stays_below <= self.opposite_above:
            raise DataError(
                f"LandingThresholds: stays_below ({self.stays_below}) must be <= opposite_above "
                f"({self.opposite_above}); swap them"
            )


#: Default landing thresholds: stays if t < 0.25, opposite if t > 0.75 and mean p(harmful) < 0.5.
LANDING_THRESHOLDS = LandingThresholds()


def _as_2d(x: Tensor, name: str) -> Tensor:
    """Float64 CPU copy of an ``[n, d]`` tensor: centroid arithmetic in low precision drifts."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty [n, d] tensor, got shape {tuple(x.shape)}")
    return x.detach().to("cpu", torch.float64)


def _same_width(d: int, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.shape[-1] != d:
            raise DataError(f"{name} has hidden size {t.shape[-1]}, expected {d}: collect all at one layer")


# ---------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------


@dataclass
class LinearProbe:
    """A logistic-regression harmful/harmless classifier on unsteered activations.

    It answers "would a reader of this layer still call the steered point harmful?", which the
    axis coordinate alone cannot: a point can sit at t = 1 yet off the harmless distribution.
    """

    model: Pipeline
    d: int

    def predict_harmful_proba(self, X: Tensor) -> Tensor:
        """p(harmful) per row of ``X [n, d]``, as a float64 tensor ``[n]``."""
        X = _as_2d(X, "X")
        _same_width(self.d, X=X)
        proba = self.model.predict_proba(X.numpy())
        harmful_col = list(self.model.classes_).index(1)
        return torch.from_numpy(np.ascontiguousarray(proba[:, harmful_col]))

    def accuracy(self, X: Tensor, y: Tensor) -> float:
        """Held-out accuracy, to check the probe is worth trusting before reading its p(harmful)."""
        p = self.predict_harmful_proba(X)
        y = torch.as_tensor(y).reshape(-1).to(torch.int64)
        return float(((p >= 0.5).to(torch.int64) == y).double().mean())


def fit_probe(X: Tensor, y: Tensor, *, C: float = 1.0, max_iter: int = 2000, seed: int = 0) -> LinearProbe:
    """Fit a linear probe (standardise + logistic regression) on *unsteered* activations.

    ``y`` is 1 for harmful, 0 for harmless. Fit it on prompts held out from the ones whose
    transformed activations it will score, or its p(harmful) measures memorisation, not geometry.
    Standardising first keeps lbfgs convergent on raw residual streams whose norms reach the
    hundreds.
    """
    X = _as_2d(X, "X")
    y_t = torch.as_tensor(y).reshape(-1)
    if y_t.shape[0] != X.shape[0]:
        raise DataError(f"fit_probe: X has {X.shape[0]} rows but y has {y_t.shape[0]} labels")
    labels = set(y_t.to(torch.int64).tolist())
    if labels != {0, 1}:
        raise DataError(
            f"fit_probe: y must contain both classes 0 (harmless) and 1 (harmful), got {sorted(labels)}"
        )
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    model.fit(X.numpy(), y_t.to(torch.int64).numpy())
    return LinearProbe(model=model, d=X.shape[1])


# ---------------------------------------------------------------------------------------------
# Landing
# ---------------------------------------------------------------------------------------------


def axis_coordinates(x: Tensor, harmful: Tensor, harmless: Tensor) -> Tensor:
    """DiM-axis coordinate t of each row of ``x`` (0 = harmful mean, 1 = harmless mean)."""
    x, harmful, harmless = _as_2d(x, "x"), _as_2d(harmful, "harmful"), _as_2d(harmless, "harmless")
    _same_width(harmful.shape[1], harmless=harmless, x=x)
    mu_h, mu_l = harmful.mean(0), harmless.mean(0)
    delta = mu_l - mu_h
    gap2 = float(delta @ delta)
    if gap2 == 0.0 or not math.isfinite(gap2):
        raise DataError("harmful and harmless centroids coincide: no DiM axis to measure along")
    return (x - mu_h) @ delta / gap2


def landing_label(
    t: float, p_harmful: float = math.nan, thresholds: LandingThresholds = LANDING_THRESHOLDS
) -> str:
    """``stays`` / ``between`` / ``opposite`` from the mean axis coordinate and probe (nan = no probe)."""
    if t < thresholds.stays_below:
        return "stays"
    if t > thresholds.opposite_above and (
        math.isnan(p_harmful) or p_harmful < thresholds.probe_harmful_below
    ):
        return "opposite"
    return "between"


#: Bootstrap resamples behind the interval on the landing coordinate t.
N_BOOTSTRAP = 2000


def bootstrap_axis_interval(
    harmful: Tensor, harmless: Tensor, transformed: Tensor, *, n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean landing coordinate t, resampling prompts.

    Conditional on the DiM axis of the full sample: every point is projected on it once, and the
    resampling is one-dimensional. (Resampling the axis too would inflate |Δ|² by the noise of a
    high-dimensional mean and bias t towards 0.) Harmless prompts are resampled on their own;
    harmful prompts jointly with their transformed rows when both have the same length (the same
    prompts before and after), so the interval covers the centroids' noise along the axis as well
    as the spread of the landing points.
    """
    harmful, harmless = _as_2d(harmful, "harmful"), _as_2d(harmless, "harmless")
    transformed = _as_2d(transformed, "transformed")
    axis = harmless.mean(0) - harmful.mean(0)
    axis = axis / torch.linalg.vector_norm(axis)
    h, s, x = harmful @ axis, harmless @ axis, transformed @ axis  # harmful, safe (harmless), transformed
    gen = torch.Generator().manual_seed(seed)

    def weights(n: int) -> Tensor:  # [n_boot, n] resampling counts / n: one matmul gives every resampled mean
        idx = torch.randint(n, (n_boot, n), generator=gen)
        return torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64)) / n

    w_h = weights(len(h))
    w_x = w_h if len(x) == len(h) else weights(len(x))
    mu_h, mu_s, mu_x = w_h @ h, weights(len(s)) @ s, w_x @ x
    t = (mu_x - mu_h) / (mu_s - mu_h)
    lo, hi = torch.quantile(t, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def interval_label(
    t: float, interval: tuple[float, float], p_harmful: float = math.nan, thresholds: LandingThresholds = LANDING_THRESHOLDS,
    p_interval: tuple[float, float] | None = None,
) -> str:
    """The landing label when the whole interval gets it, else ``inconclusive``: a label whose
    interval straddles a threshold is not decided by the sample at hand. With ``p_interval`` (the probe's
    mean p(harmful) with its interval) every combination of the two intervals' ends must agree."""
    probes = (p_harmful,) if p_interval is None else (p_harmful, *p_interval)
    labels = {landing_label(v, p, thresholds) for v in (t, *interval) for p in probes}
    return labels.pop() if len(labels) == 1 else "inconclusive"


def landing_stats(
    harmful: Tensor,
    harmless: Tensor,
    transformed: Tensor,
    probe: LinearProbe | None = None,
    thresholds: LandingThresholds = LANDING_THRESHOLDS,
) -> dict[str, float | str]:
    """Where transformed harmful activations land relative to the unsteered clusters.

    ``harmful [n, d]`` and ``harmless [m, d]`` are unsteered activations (they define the
    centroids); ``transformed [k, d]`` are harmful activations after the intervention. Distances
    are mean Euclidean distances to each centroid divided by the centroid distance.
    """
    harmful, harmless = _as_2d(harmful, "harmful"), _as_2d(harmless, "harmless")
    transformed = _as_2d(transformed, "transformed")
    _same_width(harmful.shape[1], harmless=harmless, transformed=transformed)
    mu_h, mu_l = harmful.mean(0), harmless.mean(0)
    t = axis_coordinates(transformed, harmful, harmless)
    gap = float(torch.linalg.vector_norm(mu_l - mu_h))
    t_mean = float(t.mean())
    interval = bootstrap_axis_interval(harmful, harmless, transformed)
    p, p_interval = math.nan, (math.nan, math.nan)
    if probe is not None:  # the probe's mean p(harmful) over the prompts, with a bootstrap interval over them
        p, *p_interval = bootstrap_interval(lambda x: x.mean(-1), probe.predict_harmful_proba(transformed).numpy())
    return {
        "dist_to_harmful": float(torch.linalg.vector_norm(transformed - mu_h, dim=1).mean()) / gap,
        "dist_to_harmless": float(torch.linalg.vector_norm(transformed - mu_l, dim=1).mean()) / gap,
        "axis_coordinate": t_mean,
        "axis_coordinate_std": float(t.std(correction=0)),
        "axis_coordinate_ci95": list(interval),
        "probe_p_harmful": p,
        "probe_p_harmful_ci95": list(p_interval),
        "label": landing_label(t_mean, p, thresholds),
        "label_ci": interval_label(t_mean, interval, p, thresholds, None if probe is None else tuple(p_interval)),
    }


# ---------------------------------------------------------------------------------------------
# Per-layer table
# ---------------------------------------------------------------------------------------------


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if na == 0.0 or nb == 0.0:
        return math.nan
    return float(a @ b) / (na * nb)


def _silhouette(harmful: Tensor, harmless: Tensor, max_points: int, seed: int) -> float:
    """Two-cluster Euclidean silhouette on a class-stratified, seeded subsample."""
    n, m = harmful.shape[0], harmless.shape[0]
    if n < 2 or m < 2:
        return math.nan
    if n + m > max_points:
        rng = np.random.default_rng(seed)
        n_take = min(n, max(2, round(max_points * n / (n + m))))
        m_take = min(m, max(2, max_points - n_take))
        harmful = harmful[torch.from_numpy(rng.choice(n, n_take, replace=False))]
        harmless = harmless[torch.from_numpy(rng.choice(m, m_take, replace=False))]
    X = torch.cat([harmful, harmless]).numpy()
    labels = np.r_[np.ones(harmful.shape[0], dtype=int), np.zeros(harmless.shape[0], dtype=int)]
    return float(silhouette_score(X, labels, metric="euclidean"))


def layer_table(
    harmful_by_layer: Tensor,
    harmless_by_layer: Tensor,
    direction: Tensor | None = None,
    layers: Sequence[int] | None = None,
    *,
    max_silhouette_points: int = SILHOUETTE_MAX_POINTS,
    seed: int = SILHOUETTE_SEED,
) -> list[dict[str, Any]]:
    """One row of class geometry per layer: norms, cosines and silhouette of harmful vs harmless.

    ``harmful_by_layer [L, n, d]`` / ``harmless_by_layer [L, m, d]``; ``direction`` is the refusal
    direction ``[d]`` (one for all layers) or ``[L, d]`` (one per layer); without it the
    ``cos_*_dir`` columns are left out. ``layers`` names the L stacked slices (e.g. ``[4, 8, 12]``
    when only some layers were collected); default ``0..L-1``. Like the per-layer table heretic
    prints, extended with the direction cosines, the DiM norm and cluster separability.
    """
    if harmful_by_layer.ndim != 3 or harmless_by_layer.ndim != 3:
        raise DataError(
            "layer_table wants [L, n, d] tensors, got "
            f"{tuple(harmful_by_layer.shape)} and {tuple(harmless_by_layer.shape)}"
        )
    L, _, d = harmful_by_layer.shape
    if harmless_by_layer.shape[0] != L or harmless_by_layer.shape[2] != d:
        raise DataError(
            f"harmless_by_layer {tuple(harmless_by_layer.shape)} does not match harmful_by_layer "
            f"{tuple(harmful_by_layer.shape)} in layers or hidden size"
        )
    layer_ids = list(range(L)) if layers is None else [int(i) for i in layers]
    if len(layer_ids) != L:
        raise DataError(f"layers has {len(layer_ids)} entries but the tensors stack {L} layers")
    dirs: Tensor | None = None
    if direction is not None:
        dirs = direction.detach().to("cpu", torch.float64)
        if dirs.ndim == 1:
            dirs = dirs.expand(L, -1)
        if dirs.shape != (L, d):
            raise DataError(f"direction must be [d] or [L, d] = [{L}, {d}], got {tuple(direction.shape)}")

    rows: list[dict[str, Any]] = []
    for i in range(L):
        h = _as_2d(harmful_by_layer[i], "harmful_by_layer[i]")
        ll = _as_2d(harmless_by_layer[i], "harmless_by_layer[i]")
        mu_h, mu_l = h.mean(0), ll.mean(0)
        diff = mu_h - mu_l
        row: dict[str, Any] = {
            "layer": layer_ids[i],
            "norm_harmful_mean": float(torch.linalg.vector_norm(mu_h)),
            "norm_harmless_mean": float(torch.linalg.vector_norm(mu_l)),
            "norm_diff": float(torch.linalg.vector_norm(diff)),
            "cos_means": _cos(mu_h, mu_l),
        }
        if dirs is not None:
            row["cos_harmful_dir"] = _cos(mu_h, dirs[i])
            row["cos_harmless_dir"] = _cos(mu_l, dirs[i])
            row["cos_diff_dir"] = _cos(diff, dirs[i])
        row["silhouette"] = _silhouette(h, ll, max_silhouette_points, seed)
        rows.append(row)
    return rows


def _cell(v: Any, floatfmt: str) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "nan" if math.isnan(v) else format(float(v), floatfmt)
    return str(v).replace("|", "\\|").replace("\n", " ")


def format_table(rows: list[dict[str, Any]], floatfmt: str = ".3f") -> str:
    """Markdown table of dict rows (columns in first-seen order; numbers right-aligned).

    Works for :func:`layer_table` rows and for :func:`landing_stats` dicts with a name column
    added; readable in a terminal and pasteable into a report.
    """
    if not rows:
        return ""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    cells = [[_cell(r.get(c), floatfmt) for c in cols] for r in rows]
    numeric = [
        all(
            isinstance(r.get(c), (int, float, np.number)) and not isinstance(r.get(c), bool)
            for r in rows
            if c in r
        )
        for c in cols
    ]
    widths = [max(len(c), 3, *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    sep = (
        "| "
        + " | ".join(
            ("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)
        )
        + " |"
    )
    return "\n".join([line(cols), sep, *(line(r) for r in cells)])
