"""``python bench/study.py --plan``: every run of the asked steps as done, started, changed or to do, and how long
the rest should take by the study's own record (``<model>/timings.json``), so a study spread over sessions is
planned from what it measured, not guessed.

A run's time comes from its own model's record (a run redone), else from another model's, scaled by the median
ratio of the two models' wall times on the runs both finished.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PlannedRun:
    model: str
    step: str  # the run's log path under its model's folder (its timings.json key)
    state: str  # done | changed | started | to do (state_of)
    command: str


def state_of(shown: str, stamp: Path, done: Path) -> str:
    """done: its output exists, made by this command; changed: made by another (the runner refuses it); started: a
    stamp without output (stopped or running: it resumes); to do: neither."""
    if done.exists():
        return "done" if stamp.exists() and stamp.read_text().strip() == shown else "changed"
    return "started" if stamp.exists() else "to do"


def wall_minutes(root: Path) -> dict[str, dict[str, float]]:
    """Each model's recorded wall time per run, in minutes (early records hold seconds only, later ones a dict)."""
    out = {}
    for path in sorted(root.glob("*/timings.json")):
        record = json.loads(path.read_text())
        out[path.parent.name] = {k: (v["wall_s"] if isinstance(v, dict) else float(v)) / 60 for k, v in record.items()}
    return out


def estimate(model: str, step: str, times: dict[str, dict[str, float]]) -> tuple[float, str] | None:
    """(minutes, where the figure comes from) for one run, or None when no model has run it."""
    own = times.get(model, {})
    if step in own:
        return own[step], "its own last run"
    for other, theirs in times.items():
        if other == model or step not in theirs:
            continue
        shared = [own[k] / theirs[k] for k in own.keys() & theirs.keys() if theirs[k] > 0]
        ratio = statistics.median(shared) if shared else 1.0
        how = f"{other}'s × {ratio:.2f}, the median ratio over {len(shared)} runs both made" if shared else f"{other}'s"
        return theirs[step] * ratio, how
    return None


def render_plan(planned: list[PlannedRun], root: Path) -> str:
    """A table of the runs, then per model what is left and its estimated time."""
    times = wall_minutes(root)
    lines = ["| model | run | state | minutes | from |", "|---|---|---|---|---|"]
    left: dict[str, list[float | None]] = {}
    for run in planned:
        if run.state == "done":
            minutes, source = times.get(run.model, {}).get(run.step), "measured"
        else:
            minutes, source = estimate(run.model, run.step, times) or (None, "no model has run it")
            left.setdefault(run.model, []).append(minutes)
        shown = "" if minutes is None else f"{minutes:.1f}"
        lines.append(f"| {run.model} | {run.step.removesuffix('.log')} | {run.state} | {shown} | {source} |")
    for model, minutes in left.items():
        known = [m for m in minutes if m is not None]
        unknown = len(minutes) - len(known)
        lines.append(f"\n{model}: {len(minutes)} runs left, about {sum(known):.0f} min on this record"
                     + (f" ({unknown} with no time yet)" if unknown else ""))
    if not left:
        lines.append("\nnothing left to run")
    commands = [f"{run.state}: {run.command}" for run in planned if run.state != "done"]
    return "\n".join([*lines, *([""] + commands if commands else [])])
