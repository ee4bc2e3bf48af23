"""Plots for sweep reports: refusal vs perplexity trade-off and refusal vs KL Pareto front per model, bars per intervention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refusal.fitting.plots import save_figure  # noqa: E402
from refusal.metrics.names import HARMFUL_REFUSAL, HARMLESS_KL, HARMLESS_PERPLEXITY, HARMLESS_REFUSAL

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
            x, y = row.get(HARMLESS_PERPLEXITY), row.get(HARMFUL_REFUSAL)
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


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> Path:
    """Harmful refusal rate (y) against next-token KL on harmless prompts (x), one panel per model: every
    run as a dot coloured by intervention, the Pareto front (``row["pareto"]``) ringed and joined as a
    staircase, so which method reaches low refusal at the lowest damage reads off the lower left."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        mine = [r for r in rows if r["model"] == model
                and r.get(HARMLESS_KL) is not None and r.get(HARMFUL_REFUSAL) is not None]
        for name in dict.fromkeys(r["intervention"] for r in mine):
            xs = [float(r[HARMLESS_KL]) for r in mine if r["intervention"] == name]
            ys = [100 * float(r[HARMFUL_REFUSAL]) for r in mine if r["intervention"] == name]
            ax.scatter(xs, ys, s=28, color=_colour(name), alpha=0.75, lw=0, zorder=3, label=name)
        front = sorted((r for r in mine if r.get("pareto")), key=lambda r: (r[HARMLESS_KL], r[HARMFUL_REFUSAL]))
        if front:
            fx = [float(r[HARMLESS_KL]) for r in front]
            fy = [100 * float(r[HARMFUL_REFUSAL]) for r in front]
            ax.step(fx, fy, where="post", color="black", lw=1.0, alpha=0.7, zorder=2, label="Pareto front")
            ax.scatter(fx, fy, s=90, facecolor="none", edgecolor="black", lw=1.3, zorder=4)
            for r, x, y in zip(front, fx, fy, strict=True):
                label = r["intervention"] + ("" if r["params"] == "-" else f" ({r['params']})")
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=6)
        positive = [float(r[HARMLESS_KL]) for r in mine if float(r[HARMLESS_KL]) > 0]
        if positive and max(positive) / min(positive) > 100:  # KL spans decades; symlog keeps the baseline's 0
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_title(model)
        ax.set_xlabel("next-token KL on harmless prompts (damage) →")
        ax.set_ylabel("harmful refusal rate (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Pareto front: refusal left vs damage done (lower left is better)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bars(rows: list[dict[str, Any]], path: Path) -> Path:
    """Harmful and harmless refusal rate per run, grouped by model."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    labels = [f"{r['model']}\n{r['intervention']}" + ("" if r["params"] == "-" else f"\n{r['params']}") for r in rows]
    for ax, key, title in ((axes[0], HARMFUL_REFUSAL, "harmful prompts: refusal rate"),
                           (axes[1], HARMLESS_REFUSAL, "harmless prompts: refusal rate (induced)")):
        values = [100 * (r.get(key) or 0.0) for r in rows]
        ax.bar(range(len(rows)), values, color=[_colour(r["intervention"]) for r in rows], edgecolor="black", lw=0.5)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("%")
    fig.tight_layout()
    return save_figure(fig, path)
