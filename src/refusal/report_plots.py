"""Plots for sweep reports: refusal vs perplexity trade-off per model, bars per intervention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refusal.fitting.plots import save_figure  # noqa: E402

COLOURS = {
    "none": "#555555", "actadd": "#e08214", "dim_ablation": "#b2182b",
    "inlp_nullspace": "#2166ac", "inlp_flip": "#1b7837",
}


def _colour(name: str) -> str:
    return COLOURS.get(name, "#7b3294")


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> Path:
    """Harmful refusal rate (y) against harmless perplexity (x), one panel per model."""
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        for row in [r for r in rows if r["model"] == model]:
            x, y = row.get("harmless/perplexity"), row.get("harmful/refusal_rate")
            if x is None or y is None:
                continue
            ax.scatter(x, 100 * y, s=60, color=_colour(row["intervention"]), edgecolor="black", lw=0.5, zorder=3)
            label = row["intervention"] + ("" if row["params"] == "-" else f" ({row['params']})")
            ax.annotate(label, (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_title(model)
        ax.set_xlabel("harmless perplexity (own completions) →")
        ax.set_ylabel("harmful refusal rate (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    fig.suptitle("Refusal suppressed vs fluency cost")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bars(rows: list[dict[str, Any]], path: Path) -> Path:
    """Harmful and harmless refusal rate per run, grouped by model."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    labels = [f"{r['model']}\n{r['intervention']}" + ("" if r["params"] == "-" else f"\n{r['params']}") for r in rows]
    for ax, key, title in ((axes[0], "harmful/refusal_rate", "harmful prompts: refusal rate"),
                           (axes[1], "harmless/refusal_rate", "harmless prompts: refusal rate (induced)")):
        values = [100 * (r.get(key) or 0.0) for r in rows]
        ax.bar(range(len(rows)), values, color=[_colour(r["intervention"]) for r in rows], edgecolor="black", lw=0.5)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    fig.tight_layout()
    return save_figure(fig, path)
