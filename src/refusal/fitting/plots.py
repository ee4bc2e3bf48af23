"""The per-layer score curves of DiM selection, as Arditi et al. plot them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refusal.artifacts import atomic_target  # noqa: E402
from refusal.fitting.dim import SelectionResult  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure atomically (temp file + rename) and close it."""
    try:
        with atomic_target(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def plot_selection(result: SelectionResult, path: str | Path, title: str = "") -> Path:
    """Bypass / induce / KL per layer, one line per post-instruction position; the winner starred."""
    n_layers, n_pos = result.bypass.shape
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
    panels = [
        (result.bypass, "bypass score (harmful, ablated) ↓", result.baseline_harmful),
        (result.induce, "induce score (harmless, actadd) ↑", result.baseline_harmless),
        (result.kl, "KL harmless (ablated) ↓", None),
    ]
    cmap = plt.get_cmap("viridis")
    layers = list(range(n_layers))
    for ax, (values, label, baseline) in zip(axes, panels, strict=True):
        for p in range(n_pos):
            column = values[:, p]
            if column.isnan().all():
                continue
            ax.plot(layers, column.numpy(), marker="o", ms=3, lw=1.2, color=cmap(p / max(1, n_pos - 1)),
                    label=f"pos {p - n_pos}")
        if baseline is not None:
            ax.axhline(baseline, color="grey", ls="--", lw=1, label="no intervention")
        p = result.position + n_pos
        ax.scatter([result.layer], [float(values[result.layer, p])], marker="*", s=220, color="crimson", zorder=5,
                   label="selected")
        ax.set_title(label)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[2].axhline(0.1, color="crimson", ls=":", lw=1)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title or f"DiM selection: layer {result.layer}, position {result.position}")
    fig.tight_layout()
    return save_figure(fig, path)
