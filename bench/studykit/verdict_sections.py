"""RESULTS sections that decide claims: the verdicts in plain words, the controls that swap one row, the
length curve, the methods beyond one direction and the float32 check, each re-applying the written rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refusal.compare import on_common_text, teacher_forced_vs
from refusal.geometry.compare import InterventionSpec
from refusal.stats.paired import PairedDifference

from .plan import CONTROLS, CURVE_ROWS, METHOD_CONTROLS, METHODS, geometry_spec
from .plots import plot_length_curve
from .runs import ModelRuns, pick
from .verdict import C1_MARGIN, ClaimInputs, c1, c2, decide, paired

PLAIN = {"holds": "holds", "does not hold": "does not hold", "inconclusive": "is not settled by this sample",
         "not applicable": "has no premise here"}


def reading(verdicts: dict[str, list[Any]], missing: dict[str, list[str]]) -> list[str]:
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


def controls_table(runs: dict[str, ModelRuns]) -> list[str]:
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
            row = (pick(mr.alpha, "inlp_flip", alpha=source.split("=")[1]) if source.startswith("alpha=")
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




#: What each control isolates, as pairs of runs on the same prompts: (question, run, against). A run is a main row
#: (``main:<intervention>``) or a control run of the controls step (``plan.CONTROLS``).
CONTROL_PAIRS = [
    ("DiM's direction, or any direction ablated at every write?", "main:dim_ablation", "random_1_all"),
    ("INLP's subspace, or any subspace of its rank at the DiM layer?", "main:inlp_nullspace", "random_rank_selected"),
    ("ablation's reach: every layer against the DiM layer only", "main:dim_ablation", "dim_ablation_selected"),
    ("flip's reach: every position against the post-instruction tokens it was fitted on", "main:inlp_flip", "flip_fit_positions"),
    ("nullspace's reach: every position against the post-instruction tokens", "main:inlp_nullspace", "nullspace_fit_positions"),
    ("flip's fit: at the DiM position against pooled (both post-instruction)", "flip_at_position", "flip_fit_positions"),
    ("nullspace's fit: at the DiM position against pooled (both post-instruction)", "nullspace_at_position", "nullspace_fit_positions"),
    ("LEACE against INLP nullspace, both fitted at the DiM position", "leace_erase_at_position", "nullspace_at_position"),
]


def _ratio(value: float) -> str:
    return f"{value:.3f}" if value < 1000 else f"{value:.3g}"


def control_pairs(runs: dict[str, ModelRuns]) -> list[str]:
    """What each control isolates, paired over the same prompts: Δ refusal (run − against) with Newcombe's interval
    and the harmless perplexity ratio run ÷ against with its paired bootstrap interval (both runs score the same
    unsteered completions)."""
    out = []
    for model, mr in runs.items():
        def find(name: str, mr: ModelRuns = mr) -> dict[str, Any] | None:
            row = pick(mr.main, name.split(":", 1)[1]) if name.startswith("main:") else mr.controls.get(name)
            return row if row and "outcomes" in row else None
        lines = []
        for question, name, against in CONTROL_PAIRS:
            a, b = find(name), find(against)
            if a is None or b is None:
                continue
            d = paired(a, b, f"{name} − {against}", mr.column)
            tf_a, tf_b = a["outcomes"].teacher_forced, b["outcomes"].teacher_forced
            n = len(tf_a["tokens"])
            tf_a, tf_b, common = on_common_text(tf_a, tf_b)
            found = teacher_forced_vs(tf_a, tf_b, against)
            lo, hi = found[f"harmless/perplexity_ratio_vs_{against}_ci95"]
            ratio = found[f"harmless/perplexity_ratio_vs_{against}"]
            lines.append(f"| {question} | {name.removeprefix('main:')} | {against} | {_rate(a, mr.column)} | "
                         f"{_rate(b, mr.column)} | {d.as_points()} | ×{_ratio(ratio)} [{_ratio(lo)}, {_ratio(hi)}]"
                         + (f" on the {common} of {n} prompts whose unsteered text both scored" if common < n else "") + " |")
        if lines:
            out += [f"**{model}** (refusal on `{mr.column}`; Δ in points, paired, Newcombe 95%; perplexity ratio with its "
                    "paired bootstrap 95% interval):", "",
                    "| what it isolates | run | against | run's refusal | against's refusal | Δ(run − against) | "
                    "harmless ppl, run ÷ against |", "|---|---|---|---|---|---|---|", *lines, ""]
    return out


def _rate(row: dict[str, Any] | None, column: str) -> str:
    if not row or row.get(f"{column}/refusal_rate") is None:
        return "-"
    lo, hi = row[f"{column}/refusal_rate_ci95"]
    return f"{row[f'{column}/refusal_rate']:.0%} [{100 * lo:.0f}–{100 * hi:.0f}]"


def token_section(runs: dict[str, ModelRuns], main_budget: int, figures: Path) -> list[str]:
    """The length curve: the main rows at every budget, and C1/C2 decided at each."""
    out = []
    for model, mr in runs.items():
        if not mr.tokens:
            continue
        by_budget = mr.curve(main_budget)
        budgets = sorted(by_budget)
        lines = ["| intervention | " + " | ".join(f"{b} tokens" + (" (main)" if b == main_budget else "") for b in budgets) + " |",
                 "|---|" + "---|" * len(budgets)]
        for name in CURVE_ROWS:
            lines.append(f"| {name} | " + " | ".join(_rate(pick(by_budget[b], name), mr.column) for b in budgets) + " |")
        for claim, rule in (("C1", c1), ("C2", c2)):
            cells = []
            for b in budgets:
                inputs = mr.inputs(rows=by_budget[b])
                cells.append(rule(inputs).verdict if inputs else "-")
            lines.append(f"| **{claim}** verdict | " + " | ".join(cells) + " |")
        out += [f"**{model}** (refusal on `{mr.column}`, 95% Wilson intervals):", "", *lines, "", *_cut_check(mr, main_budget)]
    if out and (plot := plot_length_curve(runs, main_budget, figures / "length_curve.png")):
        out += [f"![length curve](results/{plot.name})", ""]
    return out


def _cut_check(mr: ModelRuns, main_budget: int) -> list[str]:
    """The curve's main-budget point (cut from its longest generation) against the main rows (generated at that
    budget): the same greedy tokens in exact arithmetic, so what differs is the products' rounding."""
    if main_budget not in mr.tokens:
        return []
    found = []
    for name in CURVE_ROWS:
        cut, own = pick(mr.tokens[main_budget], name), pick(mr.main, name)
        if cut and own and "outcomes" in cut and "outcomes" in own:
            d = paired(cut, own, name, mr.column)
            found.append(f"{name} {d.as_points()} pts ({d.a_only} + {d.b_only} of {d.n} prompts judged apart)")
    if not found:
        return []
    longest = max(mr.tokens)
    return [f"Each budget is judged on its cut of one greedy generation of {longest} tokens. At {main_budget} tokens the cut "
            f"against the main rows' own {main_budget}-token generation, paired (Δ cut − own): " + "; ".join(found) + ".", ""]


def _lands(mr: ModelRuns, run: str) -> str:
    """Where a methods-step run moves harmful activations at the DiM layer (the geometry_methods step), or at its own
    selection's layer (its own geometry run), or "-"."""
    overrides = METHODS.get(run) or CONTROLS.get(run) or []
    label = InterventionSpec.parse(geometry_spec(overrides)).label if overrides else None
    g = mr.geometry_own.get(run, mr.geometry_methods).get(label) if label else None
    return f"{g['t']:.2f} [{g['t_lo']:.2f}, {g['t_hi']:.2f}] {g['label_ci']}" if g else "-"


def more_directions_add(d: PairedDifference) -> str:
    """What Δ(more directions − DiM ablation) says, with C1's margin: more suppression only if the whole interval is
    below 0; "less than the margin more" if its lower end is above −margin (the two can hold together: the first wins)."""
    if d.hi < 0:
        return f"suppresses more than DiM ablation alone, by at most {-100 * d.lo:.1f} points"
    if d.lo > -C1_MARGIN:
        return f"removes less than {C1_MARGIN * 100:.0f} points more"
    return "undecided at this n"


def _control_of(mr: ModelRuns, method: str) -> dict[str, Any] | None:
    """A method's random control: a run of the methods step, or of the controls step (random_1_all)."""
    return mr.methods.get(METHOD_CONTROLS[method]) or mr.controls.get(METHOD_CONTROLS[method])


def second_direction_alone_says(d: PairedDifference) -> str:
    """What Δ(the second direction ablated alone, DiM's kept − a random direction) says, with C1's margin: refusal
    outside DiM's direction only if the whole interval is below 0; "no more than the margin" if its lower end is above
    −margin (the two can hold together: the first wins)."""
    if d.hi < 0:
        return (f"suppresses {-100 * d.hi:.1f}–{-100 * d.lo:.1f} points more than a random direction: "
                "some refusal lives outside DiM's direction")
    if d.lo > -C1_MARGIN:
        return f"suppresses less than {C1_MARGIN * 100:.0f} points more than a random direction"
    return "undecided at this n"


def methods_section(runs: dict[str, ModelRuns]) -> list[str]:
    """Methods beyond one direction, each paired against the baseline, DiM ablation and its random control."""
    out = []
    for model, mr in runs.items():
        base, ablation = pick(mr.main, "none"), pick(mr.main, "dim_ablation")
        if not (mr.methods and base and ablation and "outcomes" in base and "outcomes" in ablation):
            continue
        lines = ["| method | refusal | Δ vs baseline | Δ vs DiM ablation | Δ vs its random control | ppl ÷ baseline | "
                 "lands (t [95%], label) | its control lands |", "|---|---|---|---|---|---|---|---|"]
        for name in METHOD_CONTROLS:
            row = mr.methods.get(name)
            if not row or "outcomes" not in row:
                continue
            control = _control_of(mr, name)
            vs_control = (f"{paired(row, control, name, mr.column).as_points()} ({METHOD_CONTROLS[name]})"
                          if control and "outcomes" in control else "not run")
            ppl = row.get("harmless/perplexity") / base["harmless/perplexity"] if row.get("harmless/perplexity") else float("nan")
            lines.append(f"| {name} | {_rate(row, mr.column)} | {paired(row, base, name, mr.column).as_points()} | "
                         f"{paired(row, ablation, name, mr.column).as_points()} | {vs_control} | {ppl:.3f} | "
                         f"{_lands(mr, name)} | {_lands(mr, METHOD_CONTROLS[name])} |")
        answers = []  # the runs with more than one direction: multi-direction ablation (nested on DiM) and the RDO cone
        for label, run in (("multi k=2", "multi_ablation_2"), ("multi k=4", "multi_ablation_4"), ("RDO cone k=3", "rdo_cone_3")):
            if (row := mr.methods.get(run)) and "outcomes" in row:
                d = paired(row, ablation, f"{label} − DiM ablation", mr.column)
                answers.append(f"{label}: Δ {d.as_points()} pts → {more_directions_add(d)}")
        alone, control = mr.methods.get("second_direction_alone"), _control_of(mr, "second_direction_alone")
        if alone and control and "outcomes" in alone and "outcomes" in control:
            d = paired(alone, control, "second direction alone − random direction", mr.column)
            answers.append(f"the second direction ablated alone (DiM's kept), against a random direction: Δ "
                           f"{d.as_points()} pts → {second_direction_alone_says(d)}")
        question = ("Does a second direction add anything once the first is removed? "
                    f"(DiM ablation leaves {_rate(ablation, mr.column)} refusing, the most a second direction could "
                    "remove.) " + "; ".join(answers) + "." if answers else "")
        out += [f"**{model}** (refusal on `{mr.column}`; paired Δ in points with Newcombe 95% intervals). {question}", "",
                *lines, ""]
    return out



def numerics_section(runs: dict[str, ModelRuns], matmul: str) -> list[str]:
    """The main rows under float32 products beside the study's: paired differences, KL, perplexity and INLP rank,
    C1/C2 under each, and whether the study's precision passes the default rule (issue 24: same verdicts, and every
    float32 refusal rate inside the study's 95% interval)."""
    out = []
    for model, mr in runs.items():
        if not mr.numerics:
            continue
        lines = [f"| intervention | {matmul} products | float32 products | Δ(float32 − {matmul}), paired | "
                 f"KL ({matmul} → float32) | perplexity | INLP rank |", "|---|---|---|---|---|---|---|"]
        inside, moved = [], []
        for name in CURVE_ROWS:
            a, b = pick(mr.main, name), pick(mr.numerics, name)
            if not (a and b and "outcomes" in a and "outcomes" in b):
                continue
            d = paired(b, a, f"{name} float32 − {matmul}", mr.column)
            lo, hi = a[f"{mr.column}/refusal_rate_ci95"]
            inside.append(lo <= b[f"{mr.column}/refusal_rate"] <= hi)
            if d.lo > 0 or d.hi < 0:
                moved.append(f"{name} ({d.as_points()} pts)")
            kl = f"{a['harmless/kl_div']:.3f} → {b['harmless/kl_div']:.3f}" if a.get("harmless/kl_div") is not None else "–"
            rank = f"{a['params/k']} → {b['params/k']}" if name.startswith("inlp") else "–"
            lines.append(f"| {name} | {_rate(a, mr.column)} | {_rate(b, mr.column)} | {d.as_points()} pts | {kl} | "
                         f"{a['harmless/perplexity']:.3f} → {b['harmless/perplexity']:.3f} | {rank} |")
        rows = {name: pick(mr.numerics, name) for name in CURVE_ROWS}
        verdicts = ""
        if all(r and "outcomes" in r for r in rows.values()) and (ours := mr.inputs()):
            exact = ClaimInputs(rows["none"], rows["dim_ablation"], rows["inlp_flip"], rows["inlp_nullspace"], ours.rank,
                                column=mr.column)
            pairs = ((c1(exact), c1(ours)), (c2(exact), c2(ours)))
            verdicts = " Under float32: " + "; ".join(f"{v.claim} {v.verdict} (study: {w.verdict})" for v, w in pairs) + "."
            same = all(v.verdict == w.verdict for v, w in pairs)
            keeps = same and all(inside)
            verdicts += (f" **{matmul} products {'pass' if keeps else 'fail'} the default rule**: the verdicts are "
                         f"{'the same' if same else 'not the same'}, and {sum(inside)} of {len(inside)} float32 refusal "
                         f"rates lie inside the {matmul} row's 95% interval.")
            if moved:
                verdicts += " The paired difference excludes 0 for " + ", ".join(moved) + "."
        out += [f"**{model}** (refusal on `{mr.column}`; the float32 runs refit DiM and INLP under float32).{verdicts}", "",
                *lines, ""]
    return out
