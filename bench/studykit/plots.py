"""The study's figures: INLP's tunability (k and α against DiM), the length curve, the Pareto fronts beside the peers'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal.fitting.plots import save_figure
from refusal.metrics.names import HARMFUL_REFUSAL, HARMLESS_PERPLEXITY
from refusal.report import pareto_front
from refusal.report.plots import _colour, plt

from .plan import CURVE_ROWS
from .runs import ModelRuns, pick


def plot_tunability(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per model: INLP k- and α-curves in the refusal-vs-perplexity plane, DiM and actadd as points."""
    models = list(dict.fromkeys(r["model"] for r in rows))  # in the order given (the study: issue order)
    fig, axes = plt.subplots(1, len(models), figsize=(5.4 * len(models), 4.4), squeeze=False)

    def point(row: dict[str, Any]) -> tuple[float, float] | None:
        x, y = row.get(HARMLESS_PERPLEXITY), row.get(HARMFUL_REFUSAL)
        return None if x is None or y is None else (float(x), 100 * float(y))

    for ax, model in zip(axes[0], models, strict=False):
        mine = [r for r in rows if r["model"] == model]
        rank = max((int(r.get("params/k") or 0) for r in mine if r["intervention"].startswith("inlp")), default=0)
        flips = [r for r in mine if r["intervention"] == "inlp_flip"]
        curves = [  # (label, varied parameter, members, style)
            ("INLP nullspace, k", "params/k", [r for r in mine if r["intervention"] == "inlp_nullspace"], "-o"),
            ("INLP flip, k (α=1)", "params/k", [r for r in flips if r.get("params/alpha", 1.0) == 1.0], "-s"),
            ("INLP flip, α (k=all)", "params/alpha", [r for r in flips if r.get("params/k") == rank], "--^"),
        ]
        for label, key, members, style in curves:
            members = sorted((m for m in members if point(m)), key=lambda m: float(m.get(key) or 0))
            if not members:
                continue
            colour = _colour("inlp_nullspace" if "nullspace" in label else "inlp_flip")
            xs, ys = zip(*(point(m) for m in members), strict=True)
            ax.plot(xs, ys, style, color=colour, label=label, ms=5, lw=1.2, alpha=0.9 if key == "params/k" else 0.6)
            for m, x, y in zip(members, xs, ys, strict=True):
                value = m.get(key)
                tag = ("all" if key == "params/k" and int(value) == rank else f"{value:g}") if value is not None else ""
                ax.annotate(("k=" if key == "params/k" else "α=") + tag, (x, y), textcoords="offset points",
                            xytext=(4, 3), fontsize=6, color=colour)
        for row in mine:
            if row["intervention"] in ("none", "dim_ablation") or (row["intervention"] == "actadd" and (row.get("params/coeff") or 0) < 0):
                xy = point(row)
                if xy:
                    name = row["intervention"] + (" c=" + f"{row['params/coeff']:g}" if "params/coeff" in row else "")
                    ax.scatter(*xy, s=70, marker="*" if row["intervention"] == "none" else "D",
                               color=_colour(row["intervention"]), edgecolor="black", lw=0.5, zorder=4, label=name)
        xs = [xy[0] for xy in map(point, mine) if xy]
        wide = bool(xs) and max(xs) / min(xs) > 10  # a broken model (ppl 1e9) would squash the rest
        if wide:
            ax.set_xscale("log")
        ax.set_title(model)
        ax.set_xlabel("harmless perplexity (own completions" + (", log) →" if wide else ") →"))
        ax.set_ylabel("harmful refusal rate (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Tunability: how much refusal each setting removes, at what fluency cost")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_length_curve(runs: dict[str, ModelRuns], main_budget: int, path: Path) -> Path | None:
    """Refusal rate on the verdict's column against the token budget, one line per main row, 95% Wilson bands."""
    models = [m for m, mr in runs.items() if mr.tokens]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(5.4 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mr = runs[model]
        by_budget = mr.curve(main_budget)
        budgets = sorted(by_budget)
        for name in CURVE_ROWS:
            rows = [(b, r) for b in budgets if (r := pick(by_budget[b], name)) and r.get(f"{mr.column}/refusal_rate") is not None]
            if not rows:
                continue
            xs = [b for b, _ in rows]
            ys = [100 * r[f"{mr.column}/refusal_rate"] for _, r in rows]
            lo = [100 * r[f"{mr.column}/refusal_rate_ci95"][0] for _, r in rows]
            hi = [100 * r[f"{mr.column}/refusal_rate_ci95"][1] for _, r in rows]
            ax.plot(xs, ys, "-o", color=_colour(name), label=name, ms=4)
            ax.fill_between(xs, lo, hi, color=_colour(name), alpha=0.15, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("new tokens (greedy)")
        ax.set_ylabel(f"refusal rate on {mr.column} (%)")
        ax.set_title(model)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)



def plot_fronts(groups: dict[str, list[dict[str, Any]]], title: str, path: Path) -> Path:
    """Every source's trials (harmful refusal against next-token KL) and its Pareto front as a step line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for (name, rows), colour in zip(groups.items(), ("tab:green", "tab:blue", "tab:red", "tab:purple", "tab:gray"), strict=False):
        points = [(float(r["harmless/kl_div"]), 100 * float(r["harmful/refusal_rate"])) for r in rows
                  if r.get("harmless/kl_div") is not None and r.get("harmful/refusal_rate") is not None]
        if not points:
            continue
        ax.scatter(*zip(*points, strict=True), s=22, color=colour, alpha=0.6, lw=0, label=f"{name} ({len(points)} trials)")
        front = sorted(points[i] for i in pareto_front([(y, x) for x, y in points]))
        ax.step(*zip(*front, strict=True), where="post", color=colour, lw=1.4)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("next-token KL on harmless prompts (lower = less damage)")
    ax.set_ylabel("harmful refusal rate (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)

