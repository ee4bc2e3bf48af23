"""The per-layer score curves of DiM selection, as Arditi et al. plot them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refusal.fitting.dim import SelectionResult  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure atomically (temp file + rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


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
