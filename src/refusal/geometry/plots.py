"""Figures for the landing geometry and the per-layer table (PNG, matplotlib Agg, no display).

Figures are built on :class:`matplotlib.figure.Figure` directly rather than through pyplot, so
plotting never switches a global backend or leaks open figures in a long-running process, and
PNGs are written atomically (temp file in the target folder, then ``os.replace``) so a crash or a
concurrent reader never sees a half-written image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import Tensor

from refusal.artifacts import atomic_target
from refusal.errors import DataError
from refusal.geometry.stats import (
    LANDING_THRESHOLDS,
    LandingThresholds,
    LinearProbe,
    _as_2d,
    _same_width,
    landing_stats,
)

DPI = 120
#: Inches per landing panel (width, height); the figure grows with the number of interventions.
PANEL_SIZE = (4.2, 3.6)
#: Extra height for the suptitle and the shared legend under the panels.
LEGEND_HEIGHT = 0.9
# The seven legend entries fit on one line from this many panels on; fewer get two lines.
_ONE_ROW_LEGEND_PANELS = 4

HARMFUL_COLOR = "#d1495b"
HARMLESS_COLOR = "#2e86c1"
TRANSFORMED_COLOR = "#1d3b2a"
LABEL_COLORS = {"stays": HARMFUL_COLOR, "between": "#7d5ba6", "opposite": HARMLESS_COLOR}

_RC = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
}


def landing_figsize(n_panels: int) -> tuple[float, float]:
    """Figure size in inches for :func:`plot_landing` with ``n_panels`` interventions."""
    legend_rows = 1 if n_panels >= _ONE_ROW_LEGEND_PANELS else 2
    return (PANEL_SIZE[0] * max(n_panels, 2), PANEL_SIZE[1] * 2 + LEGEND_HEIGHT + 0.3 * (legend_rows - 1))


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as PNG to ``path`` via a temp file in the same folder and ``os.replace``."""
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return Path(path)


def _unit(v: Tensor) -> Tensor:
    n = torch.linalg.vector_norm(v)
    return v / n if float(n) > 0 else v


def _fix_sign(v: Tensor) -> Tensor:
    """Flip a singular vector so its largest entry is positive: same data, same picture."""
    return v if float(v[v.abs().argmax()]) >= 0 else -v


def _styled(fig: Figure) -> None:
    for ax in fig.axes:
        ax.grid(True, color="#e6e6e6", linewidth=0.7)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)


def plot_landing(
    harmful: Tensor,
    harmless: Tensor,
    transformed_by_name: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    title: str = "",
    *,
    probe: LinearProbe | None = None,
    thresholds: LandingThresholds = LANDING_THRESHOLDS,
) -> Path:
    """One column per intervention showing where transformed harmful activations land.

    Top row: 2-D PCA fitted on the unsteered activations (harmful + harmless) -- the view a
    reader would draw without knowing the DiM axis. Bottom row: DiM-axis coordinate t (0 = harmful
    mean, 1 = harmless mean) against the top principal component orthogonal to that axis, both in
    units of the centroid distance, with the ``between`` band shaded -- the view in which the
    landing labels are defined. Axes are shared along each row so panels compare directly.
    """
    if not transformed_by_name:
        raise DataError("plot_landing needs at least one transformed set in transformed_by_name")
    harmful, harmless = _as_2d(harmful, "harmful"), _as_2d(harmless, "harmless")
    d = harmful.shape[1]
    _same_width(d, harmless=harmless)
    transformed = {
        name: _as_2d(x, f"transformed_by_name[{name!r}]") for name, x in transformed_by_name.items()
    }
    for name, x in transformed.items():
        _same_width(d, **{f"transformed_by_name[{name!r}]": x})

    # Shared frames, fitted on unsteered data only.
    base = torch.cat([harmful, harmless])
    center = base.mean(0)
    Z = base - center
    _, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    mu_h, mu_l = harmful.mean(0), harmless.mean(0)
    delta = mu_l - mu_h
    # Orient PC1 like the DiM axis (harmless to the right), as in the bottom row.
    pc1 = Vh[0] if float(Vh[0] @ delta) >= 0 else -Vh[0]
    pc2 = _fix_sign(Vh[1]) if Vh.shape[0] > 1 else torch.zeros(d, dtype=Z.dtype)
    pcs = torch.stack([pc1, pc2], 1)
    var = torch.cat([S**2 / (S**2).sum().clamp_min(1e-300), torch.zeros(1, dtype=S.dtype)])
    gap = float(torch.linalg.vector_norm(delta))
    if gap == 0.0:
        raise DataError("harmful and harmless centroids coincide: no DiM axis to plot along")
    e = delta / gap
    Z_perp = Z - (Z @ e)[:, None] * e
    _, _, Vp = torch.linalg.svd(Z_perp, full_matrices=False)
    ortho = _unit(_fix_sign(Vp[0] - (Vp[0] @ e) * e))

    def pca(x: Tensor) -> Tensor:
        return (x - center) @ pcs

    def dim_frame(x: Tensor) -> tuple[Tensor, Tensor]:
        rel = x - mu_h
        return rel @ delta / gap**2, rel @ ortho / gap

    k = len(transformed)
    with _rc_context():
        fig = Figure(figsize=landing_figsize(k), layout="constrained")
        axes = fig.subplots(2, k, squeeze=False, sharex="row", sharey="row")
        scatter_kw: dict[str, Any] = {"s": 9, "alpha": 0.28, "linewidths": 0, "rasterized": True}
        for j, (name, x) in enumerate(transformed.items()):
            stats = landing_stats(harmful, harmless, x, probe=probe, thresholds=thresholds)
            top, bottom = axes[0, j], axes[1, j]

            # Top: PCA of the unsteered clusters.
            ph, pl, px = pca(harmful), pca(harmless), pca(x)
            top.scatter(ph[:, 0], ph[:, 1], color=HARMFUL_COLOR, **scatter_kw)
            top.scatter(pl[:, 0], pl[:, 1], color=HARMLESS_COLOR, **scatter_kw)
            top.scatter(
                px[:, 0], px[:, 1], color=TRANSFORMED_COLOR, marker="^", s=14, alpha=0.55, linewidths=0
            )
            ch, cl, cx = pca(mu_h[None])[0], pca(mu_l[None])[0], pca(x.mean(0, keepdim=True))[0]
            top.plot([ch[0], cl[0]], [ch[1], cl[1]], color="#555555", linestyle="--", linewidth=1.0, zorder=3)
            _centroids(top, ch, cl, cx)

            # Bottom: DiM axis vs the top orthogonal PC.
            th, yh = dim_frame(harmful)
            tl, yl = dim_frame(harmless)
            tx, yx = dim_frame(x)
            bottom.axvspan(
                thresholds.stays_below, thresholds.opposite_above, color="#7d5ba6", alpha=0.08, linewidth=0
            )
            for t0, c in ((0.0, HARMFUL_COLOR), (1.0, HARMLESS_COLOR)):
                bottom.axvline(t0, color=c, linestyle=":", linewidth=1.0)
            bottom.scatter(th, yh, color=HARMFUL_COLOR, **scatter_kw)
            bottom.scatter(tl, yl, color=HARMLESS_COLOR, **scatter_kw)
            bottom.scatter(tx, yx, color=TRANSFORMED_COLOR, marker="^", s=14, alpha=0.55, linewidths=0)
            _centroids(
                bottom,
                torch.stack(dim_frame(mu_h[None]))[:, 0],
                torch.stack(dim_frame(mu_l[None]))[:, 0],
                torch.stack(dim_frame(x.mean(0, keepdim=True)))[:, 0],
            )

            label = str(stats["label"])
            head = f"{name}\n{label}: t = {_num(stats['axis_coordinate'])} ± {_num(stats['axis_coordinate_std'])}"
            if not math.isnan(float(stats["probe_p_harmful"])):
                head += f", p(harmful) = {_num(stats['probe_p_harmful'])}"
            top.set_title(head, color=LABEL_COLORS.get(label, "black"))
            top.set_xlabel(f"PC1 ({_pct(var[0])} var)")
            bottom.set_xlabel("DiM axis t  (0 = harmful mean, 1 = harmless mean)")
            if j == 0:
                top.set_ylabel(f"PC2 ({_pct(var[1])} var)")
                bottom.set_ylabel("top PC orthogonal to DiM axis\n(units of centroid distance)")
        for ax in axes[0, 1:]:
            ax.tick_params(labelleft=True)
        for ax in axes[1, 1:]:
            ax.tick_params(labelleft=True)
        _styled(fig)
        fig.legend(
            handles=_landing_handles(thresholds),
            loc="outside lower center",
            ncol=7 if k >= _ONE_ROW_LEGEND_PANELS else 4,
            frameon=False,
        )
        if title:
            fig.suptitle(title, fontsize=12, fontweight="bold")
        return _save_atomic(fig, path)


def _num(x: float | str) -> str:
    """Two decimals without a "-0.00" for values that are zero up to rounding."""
    return f"{round(float(x), 2) + 0.0:.2f}"


def _pct(fraction: Tensor) -> str:
    """Explained variance as a percentage, with a decimal where high-d PCs explain little."""
    p = 100 * float(fraction)
    return f"{p:.0f}%" if p >= 10 else f"{p:.1f}%"


def _rc_context() -> Any:
    import matplotlib

    return matplotlib.rc_context(_RC)


def _centroids(ax: Any, ch: Tensor, cl: Tensor, cx: Tensor) -> None:
    edge = {"edgecolors": "black", "linewidths": 1.0, "zorder": 5}
    ax.scatter([float(ch[0])], [float(ch[1])], marker="X", s=130, color=HARMFUL_COLOR, **edge)
    ax.scatter([float(cl[0])], [float(cl[1])], marker="X", s=130, color=HARMLESS_COLOR, **edge)
    ax.scatter([float(cx[0])], [float(cx[1])], marker="*", s=260, color=TRANSFORMED_COLOR, **edge)


def _landing_handles(thresholds: LandingThresholds) -> list[Any]:
    def dot(color: str, marker: str, label: str, size: float = 7, edge: str = "none") -> Line2D:
        return Line2D(
            [],
            [],
            color=color,
            marker=marker,
            linestyle="",
            markersize=size,
            markeredgecolor=edge,
            label=label,
        )

    return [
        dot(HARMFUL_COLOR, "o", "harmful (unsteered)"),
        dot(HARMLESS_COLOR, "o", "harmless (unsteered)"),
        dot(TRANSFORMED_COLOR, "^", "harmful, transformed"),
        dot(HARMFUL_COLOR, "X", "harmful mean", 10, "black"),
        dot(HARMLESS_COLOR, "X", "harmless mean", 10, "black"),
        dot(TRANSFORMED_COLOR, "*", "transformed mean", 13, "black"),
        Patch(
            facecolor="#7d5ba6",
            alpha=0.18,
            label=f"'between' band ({thresholds.stays_below:g} ≤ t ≤ {thresholds.opposite_above:g})",
        ),
    ]


_COS_SERIES = (
    ("cos_means", "cos(harmful mean, harmless mean)", "#888888", "-"),
    ("cos_harmful_dir", "cos(harmful mean, direction)", HARMFUL_COLOR, "-"),
    ("cos_harmless_dir", "cos(harmless mean, direction)", HARMLESS_COLOR, "-"),
    ("cos_diff_dir", "cos(mean difference, direction)", TRANSFORMED_COLOR, "-"),
)
_NORM_SERIES = (
    ("norm_harmful_mean", "|harmful mean|", HARMFUL_COLOR, "-"),
    ("norm_harmless_mean", "|harmless mean|", HARMLESS_COLOR, "-"),
    ("norm_diff", "|harmful mean − harmless mean|", TRANSFORMED_COLOR, "--"),
)


def plot_layer_table(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Per-layer curves of :func:`~refusal.geometry.stats.layer_table`: cosines, silhouette, norms.

    The dotted vertical line marks the layer with the best silhouette, the usual first guess for
    where the refusal direction is cleanest. Columns missing from ``rows`` (e.g. direction cosines
    when no direction was given) are skipped.
    """
    if not rows:
        raise DataError("plot_layer_table needs at least one row (see layer_table)")
    layers = [r["layer"] for r in rows]

    def col(key: str) -> list[float] | None:
        if not all(key in r for r in rows):
            return None
        return [float(r[key]) for r in rows]

    marker = "o" if len(rows) <= 40 else None
    with _rc_context():
        fig = Figure(figsize=(8.0, 8.2), layout="constrained")
        ax_cos, ax_sil, ax_norm = fig.subplots(3, 1, sharex=True, height_ratios=[1.3, 1.0, 1.0])
        for ax, series in ((ax_cos, _COS_SERIES), (ax_norm, _NORM_SERIES)):
            for key, label, color, ls in series:
                ys = col(key)
                if ys is not None:
                    ax.plot(layers, ys, color=color, linestyle=ls, marker=marker, markersize=3.5, label=label)
        ax_cos.axhline(0.0, color="#bbbbbb", linewidth=0.8)
        ax_cos.set_ylim(-1.05, 1.05)
        ax_cos.set_ylabel("cosine")
        ax_cos.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)

        sil = col("silhouette")
        if sil is not None:
            ax_sil.plot(
                layers, sil, color=TRANSFORMED_COLOR, marker=marker, markersize=3.5, label="silhouette"
            )
            finite = [(s, layer) for s, layer in zip(sil, layers, strict=True) if not math.isnan(s)]
            if finite:
                best_s, best_layer = max(finite)
                for ax in (ax_cos, ax_sil, ax_norm):
                    ax.axvline(best_layer, color="#7d5ba6", linestyle=":", linewidth=1.2)
                right_half = best_layer > (min(layers) + max(layers)) / 2
                ax_sil.annotate(
                    f"best: layer {best_layer} ({best_s:.2f})",
                    (best_layer, best_s),
                    textcoords="offset points",
                    xytext=(-6, -12) if right_half else (6, -12),
                    ha="right" if right_half else "left",
                    fontsize=9,
                    color="#7d5ba6",
                )
        ax_sil.axhline(0.0, color="#bbbbbb", linewidth=0.8)
        ax_sil.set_ylabel("silhouette\n(harmful vs harmless)")
        ax_norm.set_ylabel("L2 norm")
        norms = [v for key, *_ in _NORM_SERIES for v in (col(key) or []) if v > 0 and math.isfinite(v)]
        if norms and max(norms) / min(norms) > 20:
            # Real residual streams share a large offset: the mean norms dwarf their difference.
            ax_norm.set_yscale("log")
            ax_norm.set_ylabel("L2 norm (log)")
        ax_norm.set_xlabel("layer")
        ax_norm.legend(loc="best", frameon=False)
        _styled(fig)
        if title:
            fig.suptitle(title, fontsize=12, fontweight="bold")
        return _save_atomic(fig, path)


def plot_capture(record: Mapping[str, Any], path: str | os.PathLike[str], title: str = "") -> Path:
    """INLP against DiM: capture(k) = |W_k Δ|²/|Δ|² with each direction's val accuracy, and cos(w_i, r̂).

    ``record`` is :func:`refusal.fits.inlp_record`'s output (``capture``, ``cos_with_dim``,
    ``val_accuracy``, ``chance``). Reading it: where the capture curve flattens, later directions
    encode harmfulness in ways the DiM mean difference does not see.
    """
    capture, cosines = record.get("capture") or [], record.get("cos_with_dim") or []
    if not capture:
        raise DataError("plot_capture needs a record with a capture curve (INLP fitted next to a DiM direction)")
    ks = list(range(1, len(capture) + 1))
    with _rc_context():
        fig = Figure(figsize=(8.0, 6.0), layout="constrained")
        ax_cap, ax_cos = fig.subplots(2, 1, sharex=True)
        ax_cap.plot(ks, capture, color="#1b6ca8", marker="o", markersize=3, label="capture of Δ by the first k")
        acc = record.get("val_accuracy") or []
        if acc:
            ax_cap.plot(ks[: len(acc)], acc[: len(ks)], color="#d1495b", linestyle="--", label="val accuracy of direction k")
            ax_cap.axhline(float(record.get("chance", 0.5)), color="#999999", linewidth=0.8, linestyle=":", label="chance")
        ax_cap.set_ylim(0, 1.05)
        ax_cap.set_ylabel("fraction / accuracy")
        ax_cap.legend(loc="lower right", frameon=False)
        ax_cos.bar(ks[: len(cosines)], cosines, color="#66a182")
        ax_cos.axhline(0.0, color="#bbbbbb", linewidth=0.8)
        ax_cos.set_ylim(-1.05, 1.05)
        ax_cos.set_ylabel("cos(INLP direction, r̂)")
        ax_cos.set_xlabel("INLP direction k")
        fig.suptitle(title or f"INLP rank {len(capture)} ({record.get('stop_reason', '?')}) vs the DiM difference")
        _styled(fig)
        return _save_atomic(fig, path)
