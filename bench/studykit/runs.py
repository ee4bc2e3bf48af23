"""Reading a study back: one model's runs as report rows with their per-prompt outcomes, and the claim
inputs the verdict pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refusal.compare import RunOutcomes
from refusal.report import flat_row, load_runs
from refusal.run_files import completions_path

from .plan import METHODS
from .verdict import ClaimInputs


def _row(folder: Path, run: str, results: dict[str, Any]) -> dict[str, Any]:
    """A report row with its run's per-prompt outcomes (``outcomes``), which the verdict pairs prompt by prompt."""
    row = flat_row(results, run)
    if completions_path(folder / run) is not None:
        row["outcomes"] = RunOutcomes.from_dir(folder / run)
    return row


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [_row(folder, run, r) for run, r in load_runs(folder) if r.get("status", "ok") == "ok"] if folder.exists() else []


def _search_rows(folder: Path) -> list[dict[str, Any]]:
    """A search folder's finished trials as report rows, each with the folder it lies in (``dir``)."""
    return [{**flat_row(r, run), "dir": folder} for run, r in load_runs(folder)
            if r.get("status", "ok") == "ok"] if folder.exists() else []


def order_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Intervention order of the study, then by parameter value (numbers as numbers)."""
    rank = {"none": 0, "actadd": 1, "dim_ablation": 2, "inlp_nullspace": 3, "inlp_flip": 4, "leace_erase": 5,
            "leace_flip": 6, "random_ablation": 7}

    def num(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return 0.0

    return sorted(rows, key=lambda r: (rank.get(r["intervention"], 9), str(r.get("params/layers", "")),
                                       *(num(r.get(f"params/{k}")) for k in ("coeff", "alpha", "k"))))




def pick(rows: list[dict[str, Any]], intervention: str, **params: Any) -> dict[str, Any] | None:
    """The row of ``intervention`` whose shown params equal ``params`` (missing = not shown)."""
    for row in rows:
        if row["intervention"] == intervention and all(str(row.get(f"params/{k}")) == str(v) for k, v in params.items()):
            return row
    return None


class ModelRuns:
    """Everything the report reads for one model."""

    def __init__(self, mdir: Path, column: str = "harmful"):
        self.column = column  # the harmful column the claims are paired on
        self.mdir = mdir
        self.fitted = json.loads((mdir / "train" / "fitted.json").read_text()) if (mdir / "train" / "fitted.json").exists() else {}
        self.rank = int(self.fitted.get("inlp_rank") or 0)
        self.main = order_rows(_rows(mdir / "main") + _rows(mdir / "actadd"))
        self.leace = _rows(mdir / "leace")
        geo_leace, geo_selected = mdir / "geometry_leace" / "geometry.json", mdir / "geometry_leace_selected" / "geometry.json"
        self.geometry_leace = json.loads(geo_leace.read_text()) if geo_leace.exists() else {}
        self.geometry_leace_selected = json.loads(geo_selected.read_text()) if geo_selected.exists() else {}
        geo_methods = mdir / "geometry_methods" / "geometry.json"
        self.geometry_methods = {r["intervention"]: r for r in json.loads(geo_methods.read_text())["rows"]} if geo_methods.exists() else {}
        # methods with their own selection (plan.own_selection), each measured at its own layer
        self.geometry_own = {name: {r["intervention"]: r for r in json.loads(path.read_text())["rows"]}
                             for name in METHODS if (path := mdir / f"geometry_{name}" / "geometry.json").exists()}
        # the k sweep decides C3 once it has ended (its report written), never from the jobs done so far
        self.k = _rows(mdir / "k") if (mdir / "k" / "report.csv").exists() else []
        self.alpha = _rows(mdir / "alpha")
        self.controls = {run.split("/")[0]: _row(mdir / "controls", run, r) for run, r in load_runs(mdir / "controls")
                         if r.get("status", "ok") == "ok"} if (mdir / "controls").exists() else {}
        self.tokens = {int(p.name): order_rows(_rows(p)) for p in (mdir / "tokens").iterdir()
                       if p.is_dir() and p.name.isdigit()} if (mdir / "tokens").exists() else {}  # budget -> main rows
        self.heldout = order_rows(_rows(mdir / "heldout"))
        self.numerics = order_rows(_rows(mdir / "numerics"))
        self.capability = order_rows(_rows(mdir / "capability"))
        for row in self.capability:  # the main row of the same intervention gains its capability (the broken-model rule)
            if (main := pick(self.main, row["intervention"])) is not None:
                main.update({k: v for k, v in row.items() if k.startswith("capability/")})
        self.quality = order_rows(_rows(mdir / "quality"))
        self.methods = {run.split("/")[0]: _row(mdir / "methods", run, r) for run, r in load_runs(mdir / "methods")
                        if r.get("status", "ok") == "ok"} if (mdir / "methods").exists() else {}
        self.heldout_raw = {r["intervention"]: r for _, r in load_runs(mdir / "heldout")} if (mdir / "heldout").exists() else {}
        self.pareto = _search_rows(mdir / "pareto")  # the INLP-flip search and the reference runs
        self.pareto_weighted = _search_rows(mdir / "pareto_weighted")  # heretic's kernel and space, our search
        self.pareto_unfiltered = _search_rows(mdir / "pareto_unfiltered")  # its start-up trials, refusal filter off
        geo = mdir / "geometry" / "geometry.json"
        self.geometry = json.loads(geo.read_text()) if geo.exists() else {}

    def curve(self, main_budget: int) -> dict[int, list[dict[str, Any]]]:
        """Budget -> the main rows judged at that budget: the length curve's own runs (cuts of one generation), with
        the main rows as the main budget's point only where the curve has none of its own."""
        return self.tokens if main_budget in self.tokens else {**self.tokens, main_budget: self.main}

    def geometry_row(self, label: str) -> dict[str, Any] | None:
        return next((r for r in self.geometry.get("rows", []) if r["intervention"] == label), None)

    def inputs(self, k_cap: int | None = None, rows: list[dict[str, Any]] | None = None) -> ClaimInputs | None:
        """Claim inputs at the converged rank, or with INLP cut to its first ``k_cap`` directions;
        ``rows`` replaces the main rows (e.g. the same runs at another token budget)."""
        rank = self.rank if k_cap is None else min(k_cap, self.rank)
        main = self.main if rows is None else rows
        by_k: dict[str, dict[int, dict[str, Any]]] = {"inlp_flip": {}, "inlp_nullspace": {}}
        for name, found in by_k.items():
            found.update({int(r["params/k"]): r for r in self.k
                          if r["intervention"] == name and int(r["params/k"]) < rank and "outcomes" in r})
            found[rank] = pick(main, name, k=rank) if rank == self.rank else pick(self.k, name, k=rank)
        baseline, ablation = pick(main, "none"), pick(main, "dim_ablation")
        flip, null = by_k["inlp_flip"][rank], by_k["inlp_nullspace"][rank]
        if not all(row and "outcomes" in row for row in (baseline, ablation, flip, null)):
            return None  # a row missing, or made before runs recorded per-prompt outcomes (rerun that step)
        suffix = "" if k_cap is None else f" (k={k_cap})"
        geometry = {key: g for key, label in (("nullspace", "inlp_nullspace"), ("flip", "inlp_flip"))
                    if (g := self.geometry_row(label + suffix))}
        return ClaimInputs(baseline, ablation, flip, null, rank, by_k["inlp_flip"], by_k["inlp_nullspace"], geometry,
                           self.column)

