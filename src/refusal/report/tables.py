"""Sweep report: every run's metrics as a Markdown table, a CSV and plots, with no network.

    python -m refusal.report multirun/2026-11-28/12-00-00

Also written automatically at the end of each Hydra multirun (see :mod:`refusal.app.hydra_callbacks`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal.artifacts import atomic_write_text, shown_path
from refusal.metrics.names import HARMFUL_REFUSAL, HARMLESS_KL, HARMLESS_PERPLEXITY, HARMLESS_REFUSAL
from refusal.report.pareto import FRONT, dominates, mark_front, pareto_front  # noqa: F401  (kept importable from here)
from refusal.report.plots import plot_bars, plot_pareto, plot_tradeoff
from refusal.stats.paired import holm

#: McNemar's p of each run's harmful refusal against its baseline, Holm-adjusted over the runs of one model.
HOLM_KEY = "harmful/mcnemar_p_vs_baseline_holm"

COLUMNS = [
    ("model", "model"),
    ("intervention", "intervention"),
    ("params", "params"),
    ("layer", "layer"),
    (HARMFUL_REFUSAL, "harmful refusal"),
    ("harmful/refusal_rate_vs_baseline", "Δ harmful vs none"),
    (HOLM_KEY, "McNemar p (Holm)"),
    ("harmful/refusal_score", "harmful score"),
    (HARMLESS_REFUSAL, "harmless refusal"),
    (HARMLESS_PERPLEXITY, "harmless ppl"),
    ("harmless/perplexity_ratio_vs_baseline", "ppl ÷ none"),
    (HARMLESS_KL, "KL"),
    ("geometry/label", "lands"),
    ("n_harmful", "n"),
]


#: Parameter values not worth a column entry (the defaults of the built-ins).
DEFAULT_PARAMS = {("center", "midpoint"), ("target", "harmless"), ("export", False)}
#: Parameters with a column of their own (``layer``) or none worth showing.
HIDDEN_PARAMS = {"name", "layer"}
#: The two objectives of the Pareto front, both minimised: what the search is about (refusal left, damage done).


PAIRED_NOTE = (
    "Refusal rates: 95% Wilson intervals. *Δ harmful vs none*: each run against the unsteered model on the same "
    "prompts (its own baseline completions, which are the `none` run's), paired prompt by prompt: the difference "
    "in points with Newcombe's paired score interval; *McNemar p (Holm)*: McNemar's exact test of that "
    "difference, Holm-adjusted over the runs of the same model here. *ppl ÷ none*: harmless perplexity over the "
    "unsteered model's on the same completions; it and KL with paired bootstrap intervals over prompts; "
    "*<task> Δ acc vs none*: a capability benchmark's accuracy minus the unsteered model's on the same items, in "
    "points with Newcombe's paired score interval "
    "(`python -m refusal.compare RUN_A RUN_B` pairs any two runs on the same prompts).")


@dataclass
class Report:
    markdown_path: Path
    csv_path: Path
    plots: list[Path]
    markdown_table: str
    failures: list[tuple[str, str]] = field(default_factory=list)


def _params(results: dict[str, Any]) -> dict[str, Any]:
    params = results.get("params") or {}  # every parameter (a plugin's too, so a search over it shows)
    shown = {k: "[" + ",".join(map(str, v)) + "]" if isinstance(v, list | tuple) else v  # layers, explained shares
             for k, v in params.items() if k not in HIDDEN_PARAMS and v is not None}
    return {k: v for k, v in shown.items() if (k, v) not in DEFAULT_PARAMS}


def format_params(params: dict[str, Any]) -> str:
    """``k=v, ...`` as report tables show parameters (floats to 3 significant digits), "-" for none."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def flat_row(results: dict[str, Any], run: str = "") -> dict[str, Any]:
    metrics = results.get("metrics", {})
    params = _params(results)
    row = {
        "run": run,
        "status": results.get("status", "ok"),
        "model": results.get("model"),
        "intervention": results.get("intervention"),
        "params": format_params(params),
        **{f"params/{k}": v for k, v in params.items()},
        "layer": results.get("intervention_layer", results.get("layer")),
        "judge": results.get("judge", "substring"),  # the primary judge
        **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))},
    }
    row.update({k: v for k, v in metrics.items() if k.endswith("_ci95")})
    geo = (results.get("geometry") or {}).get("landing") or {}
    if geo:
        row["geometry/label"] = geo.get("label")
        row["geometry/axis_coordinate"] = geo.get("axis_coordinate")
    return row


def _fmt(value: Any, key: str, row: dict[str, Any]) -> str:
    if value is None:
        return "-"
    ci = row.get(f"{key}_ci95")
    if key.endswith(("refusal_rate", "/accuracy")):
        text = f"{100 * value:.1f}%"
        return f"{text} [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]" if ci else text
    if "/refusal_rate_vs_" in key or "/accuracy_vs_" in key:  # a paired difference, in points
        text = f"{100 * value:+.1f}"
        return f"{text} [{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}]" if ci else text
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
        return f"{text} [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else text
    return str(value)


def columns_for(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """COLUMNS plus what the runs have: a column per test set (after harmless refusal), one per extra
    judge on harmful prompts, the judges' κ, the StrongREJECT-style quality of harmful columns, and each capability benchmark's accuracy with its paired
    difference from the unsteered model on the same items (after KL)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    sets = [k for k in keys if k.endswith("/refusal_rate") and k.count("/") == 1
            and k.split("/")[0] not in ("harmful", "harmless", "baseline")]
    primary = {row.get("judge") for row in rows}
    judged = [k for k in keys if k.startswith("harmful/judge/") and k.endswith("/refusal_rate")
              and k.split("/")[2] not in primary]  # the primary judge's rate is the plain column
    kappas = [k for k in keys if k.startswith("judges/kappa/")]
    cut = [key for key, _ in COLUMNS].index(HARMLESS_REFUSAL) + 1
    extra = [(k, f"{k.split('/')[0]} refusal") for k in sets]
    extra += [(k, f"harmful refusal ({k.split('/')[2]})") for k in judged]
    extra += [(k, f"κ {k.removeprefix('judges/kappa/')}") for k in kappas]
    extra += [(k, f"{k.split('/')[0]} quality") for k in keys if k.endswith("/quality") and k.count("/") == 1]
    at = [key for key, _ in COLUMNS].index(HARMLESS_KL) + 1
    titles = {"/accuracy": "acc", "/accuracy_vs_baseline": "Δ acc vs none", "/cross_entropy": "CE"}
    capability = [(k, f"{k.split('/')[1]} {titles[suffix]}") for k in keys if k.startswith("capability/")
                  for suffix in titles if k.endswith(suffix)]
    return COLUMNS[:cut] + extra + COLUMNS[cut:at] + capability + COLUMNS[at:]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = columns_for(rows)
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key), key, row) for key, _ in columns) + " |")
    return "\n".join(lines)


def format_run(results: dict[str, Any]) -> str:
    """One run's results for the terminal."""
    row = flat_row(results)
    lines = [f"\n{results.get('model')} · {results.get('intervention')} ({row['params']}) · layer {_fmt(row['layer'], 'layer', row)}",
             markdown_table([row])]
    timings = results.get("timings") or {}
    if timings:
        lines.append("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    if (results.get("metrics") or {}).get("warning"):
        lines.append("warning: " + results["metrics"]["warning"])
    return "\n".join(lines)


def mark_holm(rows: list[dict[str, Any]]) -> None:
    """Set :data:`HOLM_KEY` on every run with a paired McNemar p against its baseline: Holm-adjusted over
    the runs of the same model in this folder, which are tested together against the same baseline."""
    raw = "harmful/mcnemar_p_vs_baseline"
    for model in dict.fromkeys(r.get("model") for r in rows):
        tested = [r for r in rows if r.get("model") == model and r.get(raw) is not None]
        for row, p in zip(tested, holm([r[raw] for r in tested]), strict=True):
            row[HOLM_KEY] = p


def front_table(rows: list[dict[str, Any]]) -> str:
    """The front as Markdown: a table per model (its own front), by KL ascending, so refusal falls down it."""
    columns = [("intervention", "intervention"), ("params", "params"), ("layer", "layer"),
               (FRONT[0], "harmful refusal"), (FRONT[1], "KL"), ("run", "run")]
    out = []
    for model in dict.fromkeys(r.get("model") for r in rows if r.get("pareto")):
        on = sorted((r for r in rows if r.get("pareto") and r.get("model") == model), key=lambda r: (r[FRONT[1]], r[FRONT[0]]))
        out += [f"### {model}", "", "| " + " | ".join(t for _, t in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        out += ["| " + " | ".join(_fmt(r.get(k), k, r) for k, _ in columns) + " |" for r in on]
        out.append("")
    return "\n".join(out).rstrip("\n")


def load_runs(sweep_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    runs = []
    for path in sorted(sweep_dir.glob("*/results.json")) + sorted(sweep_dir.glob("*/*/results.json")):
        try:
            runs.append((str(path.parent.relative_to(sweep_dir)), json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError) as err:
            runs.append((str(path.parent.relative_to(sweep_dir)), {"status": "failed", "error": f"unreadable results.json: {err}"}))
    return runs


def write_report(sweep_dir: str | Path) -> Report:
    """Write report.md, report.csv and plots into ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    ok = [flat_row(r, run) for run, r in runs if r.get("status", "ok") == "ok"]
    failures = [(run, r.get("error", "unknown error")) for run, r in runs if r.get("status", "ok") != "ok"]
    mark_front(ok)
    mark_holm(ok)
    table = markdown_table(ok)
    plots = []
    if any(r.get(HARMLESS_PERPLEXITY) is not None for r in ok):  # lean search trials have no perplexity
        plots.append(plot_tradeoff(ok, sweep_dir / "tradeoff.png"))
    if any(r.get("pareto") for r in ok):
        plots.append(plot_pareto(ok, sweep_dir / "pareto.png"))
    if ok:
        plots.append(plot_bars(ok, sweep_dir / "bars.png"))
    md = [f"# Sweep report: {shown_path(sweep_dir)}", "", f"{len(ok)} runs succeeded, {len(failures)} failed.", "", table, "",
          PAIRED_NOTE, ""]
    if any(r.get("pareto") for r in ok):
        md += ["## Pareto front: harmful refusal vs next-token KL", "",
               "Runs no other run of the same model beats on both (lower harmful refusal, lower KL on harmless "
               "prompts), across every intervention and trial in this folder"
               + (" that met its constraints (" + "; ".join(sorted({c for _, r in runs for c in r.get("constraints") or []}))
                  + ")" if any(r.get("constraints") for _, r in runs) else "") + ".", "", front_table(ok), ""]
    if failures:
        md += ["## Failed runs", ""] + [f"- `{run}`: {err}" for run, err in failures] + [""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    md_path = sweep_dir / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    keys: list[str] = []
    for row in ok:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(ok)
    csv_path = sweep_dir / "report.csv"
    atomic_write_text(csv_path, buf.getvalue())
    return Report(md_path, csv_path, plots, table, failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refusal.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (or any folder of run folders)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    report = write_report(args.sweep_dir)
    print(report.markdown_table)
    print(f"\nwrote {report.markdown_path}, {report.csv_path}" + "".join(f", {p}" for p in report.plots))
    for run, err in report.failures:
        print(f"FAILED {run}: {err}")
    return 1 if report.failures else 0

