"""The study runner: each step an ordinary ``train.py`` / ``evaluate.py`` / ``python -m refusal.geometry``
command, skipped when its output exists (so an interrupted study resumes), stamped and timed."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from refusal.artifacts import atomic_write_text
from refusal.run_files import archive_completions

from .plan import (
    CAPABILITY_TASKS,
    CONTROLS,
    GEOMETRY_SPECS,
    HELDOUT_ROWS,
    LEGACY_K,
    METHOD_GEOMETRY_SPECS,
    METHODS,
    NO_GEOMETRY,
    NO_OVERREFUSAL,
    QUALITY,
    REPO,
    STARTUP_TRIALS,
    geometry_spec,
    own_selection,
    swept,
)
from .progress import PlannedRun, state_of


class Study:
    def __init__(self, root: Path, common: list[str], splits: Path, plan_only: bool = False) -> None:
        self.root, self.common = root.resolve(), common
        # plan_only: each run is listed with its state (progress.PlannedRun), none is started
        self.planned: list[PlannedRun] | None = [] if plan_only else None
        # the machine's folders as placeholders in stamps: study/ is committed, and resumes from another checkout
        self.places = {str(self.root): "$STUDY", str(splits.resolve()): "$SPLITS"}

    def portable(self, argv: list[str]) -> str:
        """The command as stamped and listed in the report, with the study and splits folders as placeholders."""
        shown = " ".join(shlex.quote(a) for a in ["python", *argv])
        for path, name in self.places.items():
            shown = shown.replace(path, name)
        return shown

    def run(self, argv: list[str], log: Path, done: Path) -> bool:
        """Run one step unless ``done`` exists; output goes to ``log``; returns success."""
        shown = self.portable(argv)
        stamp = log.with_suffix(".command")
        if self.planned is not None:
            model, *step = log.relative_to(self.root).parts
            self.planned.append(PlannedRun(model, "/".join(step), state_of(shown, stamp, done), shown))
            return done.exists()
        if done.exists():
            if stamp.exists() and stamp.read_text().strip() == shown:
                print(f"skip (done): {shown}")
                return True
            raise SystemExit(f"{done} was made by another command (see {stamp}); delete {done.parent} "
                             "to redo it with these settings, or pass another --root")
        # a stamp of this command without its output: an earlier segment stopped, this one resumes from its caches
        # and appends to its log
        resumed = stamp.exists() and stamp.read_text().strip() == shown
        print(f"{'resume' if resumed else 'run'}: {shown}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, shown + "\n")
        t0, cpu0 = time.perf_counter(), _children_cpu()
        # the fits go with the study (study/artifacts, committed): its selection table reads them on any checkout
        env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
               "REFUSAL_ARTIFACTS": str(self.root / "artifacts")}
        interrupted = False
        with log.open("a" if resumed else "w") as fh:
            if resumed:
                fh.write(f"\n--- resumed {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
                fh.flush()
            proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait()
            except KeyboardInterrupt:  # the step is stopped (its caches stay for the resume); its time is kept
                proc.kill()
                proc.wait()  # reaped before its CPU time is read (subprocess.call waited only 0.25 s)
                rc, interrupted = 130, True
        if rc == 0:  # the study folder is committed: its per-prompt records gzipped (refusal.run_files)
            archive_completions(done.parent)
        took = time.perf_counter() - t0
        self._record_time(log, took, _children_cpu() - cpu0, finished=rc == 0)
        print(f"  {'ok' if rc == 0 else f'FAILED (exit {rc}), see {log}'} in {took / 60:.1f} min", flush=True)
        if interrupted:
            raise KeyboardInterrupt
        return rc == 0

    def _record_time(self, log: Path, wall: float, cpu: float, finished: bool) -> None:
        """Wall time, and the step's CPU time (all threads): a step paused to give the CPU to another reads long on
        the wall, not in CPU time. A segment that stopped is marked so; the next one adds to it and counts segments."""
        model, *step = log.relative_to(self.root).parts
        timings = self.root / model / "timings.json"  # one file per model: studies of two models may run at once
        saved = json.loads(timings.read_text()) if timings.exists() else {}
        entry: dict[str, Any] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        earlier = saved.get("/".join(step))
        if isinstance(earlier, dict) and earlier.get("stopped"):
            entry = {"wall_s": round(wall + earlier["wall_s"], 1), "cpu_s": round(cpu + earlier["cpu_s"], 1),
                     "segments": earlier.get("segments", 1) + 1}
        if not finished:
            entry["stopped"] = True
        saved["/".join(step)] = entry
        atomic_write_text(timings, json.dumps(saved, indent=2) + "\n")

    def sweep(self, out: Path, name: str, args: list[str], overrides: list[str]) -> None:
        self.run(["evaluate.py", "-m", *args, *overrides, f"hydra.sweep.dir={out / name}"],
                 out / f"{name}.log", out / name / "report.csv")

    def methods_geometry(self, out: Path, args: list[str]) -> None:
        """Where each method and its random control move harmful activations (the fits come from the runs' artifacts):
        two forward passes per method, no generation; a method with its own selection also at its own layer."""
        self.run(["-m", "refusal.geometry", "--interventions", ",".join(METHOD_GEOMETRY_SPECS), "--out",
                  str(out / "geometry_methods"), *args], out / "geometry_methods.log", out / "geometry_methods" / "geometry.json")
        for name, overrides in METHODS.items():  # a method with its own selection: its own layer's clusters
            if selection := own_selection(overrides):
                folder = out / f"geometry_{name}"
                self.run(["-m", "refusal.geometry", "--interventions", f"none,{geometry_spec(overrides)}", "--out",
                          str(folder), *args, *selection], out / f"geometry_{name}.log", folder / "geometry.json")

    def model(self, model: str, steps: list[str], opts: argparse.Namespace) -> None:
        out = self.root / model
        args = [f"model={model}", *self.common]
        if not self.run(["train.py", *args, f"hydra.run.dir={out / 'train'}"], out / "train.log", out / "train" / "fitted.json"):
            return
        fitted = json.loads((out / "train" / "fitted.json").read_text())
        rank = int(fitted["inlp_rank"])
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
        if "controls" in steps:  # each swaps one row of C1/C2 (decided on the held-out column): no over-refusal column
            for name in opts.controls:
                overrides = [o.format(rank=rank) for o in CONTROLS[name]]
                run_dir = out / "controls" / name
                self.run(["evaluate.py", *args, *overrides, NO_OVERREFUSAL, f"hydra.run.dir={run_dir}"],
                         out / "controls" / f"{name}.log", run_dir / "results.json")
        if "numerics" in steps and model in opts.token_models and opts.matmul != "float32":
            # the products' precision checked at the study's own sizes: the main rows again in float32 (refitted
            # under float32, as a float32 study would be), paired prompt by prompt with the main rows
            self.sweep(out, "numerics", [a for a in args if not a.startswith("model.matmul=")],
                       ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip", "model.matmul=float32", NO_GEOMETRY])
        if "tokens" in steps and model in opts.token_models and opts.token_budgets:
            # the length curve: one folder per budget, each resumable; every budget is judged on its cut of the same
            # greedy generation at the longest (whichever runs first generates it, the others read it from the cache)
            longest = max(opts.token_budgets)
            for budget in opts.token_budgets:
                self.sweep(out / "tokens", str(budget), [a for a in args if not a.startswith("eval.max_new_tokens=")],
                           ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip",  # the rows C1 and C2 compare
                            f"eval.max_new_tokens={budget}", f"eval.generate_new_tokens={longest}", NO_OVERREFUSAL,
                            NO_GEOMETRY])
        if "leace" in steps:  # the third family: LEACE erasure and its flip, with their own geometry
            self.sweep(out, "leace", args, ["intervention=leace_erase,leace_flip"])
            self.run(["-m", "refusal.geometry", "--interventions", "none,leace_erase,leace_flip", "--out",
                      str(out / "geometry_leace"), *args], out / "geometry_leace.log", out / "geometry_leace" / "geometry.json")
            # control: the eraser fitted at the DiM position only (the default pools every post-instruction position)
            self.run(["-m", "refusal.geometry", "--interventions", "none,leace_erase,leace_flip", "--out",
                      str(out / "geometry_leace_selected"), *args, "fit.inlp.positions=selected"],
                     out / "geometry_leace_selected.log", out / "geometry_leace_selected" / "geometry.json")
        if "methods" in steps:  # one run each, resumable one by one (an RDO fit is minutes on a CPU)
            for name in opts.methods:
                run_dir = out / "methods" / name
                self.run(["evaluate.py", *args, *METHODS[name], NO_GEOMETRY, f"hydra.run.dir={run_dir}"],
                         out / "methods" / f"{name}.log", run_dir / "results.json")
            if missing := [name for name in METHODS if not (out / "methods" / name / "results.json").exists()]:
                print(f"[{model}] methods: geometry waits for every method's run; not run yet: {', '.join(missing)}", flush=True)
            else:
                self.methods_geometry(out, args)
        if "capability" in steps:  # the main rows again with the benchmarks: generations and scores come from the cache
            self.sweep(out, "capability", args, ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip", NO_GEOMETRY,
                                                 f"eval.capability.tasks={CAPABILITY_TASKS}"])
        if "quality" in steps:  # the main rows again with the StrongREJECT quality of their harmful completions (cached)
            self.sweep(out, "quality", args, ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip", NO_GEOMETRY, *QUALITY])
        if "heldout" in steps:  # fitted on the splits as always; tested on HarmBench and the over-refusal set, two judges
            n = opts.heldout_n
            harmbench = f"eval.test_sets.harmbench={{source: pypi, benchmark: harmbench, n: {n}}}"
            kept = [a for a in args if not a.startswith(("data.n_test=", "eval.test_sets.overrefusal.n=", "+eval.test_sets.harmbench="))]
            self.sweep(out, "heldout", kept, [f"intervention={HELDOUT_ROWS}", f"data.n_test={n}", "eval.judges=[substring,model]",
                                              f"+{harmbench}", f"eval.test_sets.overrefusal.n={n}", NO_GEOMETRY])
        lean = [a for a in args if "eval.test_sets." not in a]  # eval=trial judges the test split only: no named sets
        # heretic's shortest falloff (1 layer) as a fraction of the last layer index
        closest = [f"intervention.{part}_min_weight_distance=interval({1 / (int(fitted['n_layers']) - 1):.6g},0.6)"
                   for part in ("attn", "mlp")] if {"pareto", "unfiltered"} & set(steps) else []
        if "pareto" in steps and opts.pareto_trials:  # Optuna: INLP flip's k and α at the DiM layer; heretic's kernel
            self.sweep(out, "pareto", lean, ["intervention=none,dim_ablation,actadd", "eval=trial"])  # the reference points
            self.run(["evaluate.py", "experiment=pareto_inlp_flip", "intervention.layer=null",
                      f"hydra.sweeper.n_trials={opts.pareto_trials}", *lean, f"hydra.sweep.dir={out / 'pareto'}"],
                     out / "pareto_search.log", out / "pareto" / "optimization_results.yaml")
            # heretic's method (kernel, space, fixed choices) in our search, as many trials: its own folder
            self.run(["evaluate.py", "experiment=pareto_weighted_ablation", f"hydra.sweeper.n_trials={opts.pareto_trials}",
                      *closest, *lean, f"hydra.sweep.dir={out / 'pareto_weighted'}"],
                     out / "pareto_weighted.log", out / "pareto_weighted" / "optimization_results.yaml")
        if "unfiltered" in steps:
            # the same search's random start-up trials (the parameters heretic's run drew too) with Arditi's refusal
            # filter off: the direction from every fit prompt, as heretic's; does the filter make ours differ?
            self.run(["evaluate.py", "experiment=pareto_weighted_ablation", f"hydra.sweeper.n_trials={STARTUP_TRIALS}",
                      "fit.filter_train=false", *closest, *lean, f"hydra.sweep.dir={out / 'pareto_unfiltered'}"],
                     out / "pareto_unfiltered.log", out / "pareto_unfiltered" / "optimization_results.yaml")
        if "geometry" in steps:
            specs = ",".join(s for s in GEOMETRY_SPECS if not s.endswith(f"k={LEGACY_K}") or LEGACY_K < rank)
            self.run(["-m", "refusal.geometry", "--interventions", specs, "--out", str(out / "geometry"), *args],
                     out / "geometry.log", out / "geometry" / "geometry.json")


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
