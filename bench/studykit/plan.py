"""What the study runs: its models, steps, sweeps and control runs (each a set of Hydra overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]

STUDY_MODELS = ["qwen05", "qwen15"]  # the packaged models that refuse
# Negative controls: a chat model that barely refuses and a base model with no chat tuning. They get the main rows
# only: with no refusal to suppress, C1–C3 have no premise, and they show what the methods do where there is none.
CONTROL_MODELS = ["smollm2", "gemma3_270m"]
# The DiM picks published before selection followed refusal_direction exactly (docs/RESULTS.md at commit ff82bc1:
# layers < n − floor(0.2·n), no prompt filter, float32 log-odds, induce >): the "before" column of the selection table.
PICKS_BEFORE = {"qwen05": "L15P-1", "qwen15": "L22P-2"}
SPLITS_DIR = REPO.parent / "shared" / "data" / "refusal_direction_splits"
STEPS = ["main", "actadd", "k", "alpha", "controls", "tokens", "geometry", "leace", "methods", "heldout", "pareto",
         "unfiltered", "numerics", "capability", "quality"]
#: The Optuna searches' random start-up trials (conf/experiment/pareto.yaml), the same draws in every search of
#: one space: the unfiltered step reruns these of heretic's kernel.
STARTUP_TRIALS = int(yaml.safe_load((REPO / "conf" / "experiment" / "pareto.yaml").read_text())
                     ["hydra"]["sweeper"]["sampler"]["n_startup_trials"])
#: The capability step's benchmarks under each main row: 5-shot MMLU over all 57 subjects (4 seeded questions each);
#: ARC-Challenge 100, lettered and in its cloze form (where small models are above chance); HellaSwag 100 (cloze);
#: LAMBADA 100 passages (cross-entropy of general text, not of the model's own completions); GSM8K 100 (cross-entropy
#: of the gold worked solutions: arithmetic without generating).
CAPABILITY_TASKS = "[mmlu,arc_challenge,arc_challenge_rc,hellaswag_rc,lambada,gsm8k]"
#: The quality step: the StrongREJECT rubric asked of qwen15 (its reasoning line, then its digits, in bfloat16: ~5x
#: faster here; the refusal judge gave float32's labels on 246 of 246 gold completions), item 1 from the primary
#: refusal judge, about a seeded sample of 100 StrongREJECT completions per main row (~9 s each on 2 idle cores), paired with the
#: unsteered model's completions of the same prompts. The gold check (docs/results/quality_gold.json) must use these.
QUALITY_JUDGE = {"model": "qwen15", "matmul": "bfloat16", "reasoning_tokens": 96, "refused": "judge"}
QUALITY = ["eval.quality=true", *(f"eval.quality_judge.{k}={v}" for k, v in QUALITY_JUDGE.items()),
           "eval.quality_judge.columns=[strongreject]", "eval.quality_judge.n=100"]
HELDOUT_ROWS = "none,actadd,dim_ablation,inlp_nullspace,inlp_flip"
# C3 is decided on at least 6 values of k, full rank included (studykit.verdict.C3_MIN_GRID); the converged
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
#: Δ(multi k − DiM ablation) asks whether a second direction adds anything once the first is removed. That Δ is
#: bounded by the few prompts DiM ablation leaves refusing, so the second direction is also ablated alone (DiM's
#: kept) against a random direction: does it carry refusal on its own?
METHODS = {
    "projected_ablation": ["intervention=projected_ablation"],
    "projected_ablation_norm": ["intervention=projected_ablation", "intervention.norm_preserving=true"],
    "multi_ablation_2": ["intervention=multi_ablation", "intervention.k=2"],
    "multi_ablation_4": ["intervention=multi_ablation", "intervention.k=4"],
    "second_direction_alone": ["intervention=multi_ablation", "intervention.k=2", "intervention.without_dim=true"],
    "rdo_direction": ["intervention=rdo_ablation", "intervention.k=1"],
    "rdo_cone_3": ["intervention=rdo_ablation", "intervention.k=3"],
    # the direction and layer COSMIC picks from activation cosines (no refusal scores read), ablated like DiM's
    "cosmic_ablation": ["intervention=dim_ablation", "layer=cosmic"],
    # heretic's own choices at every kernel weight 1 (the kernel is what a search tunes: the pareto step, the peers):
    # each layer's writes lose that layer's DiM direction, made orthogonal to the harmless mean; embedding kept
    "heretic_per_layer": ["intervention=weighted_ablation", "intervention.direction=per_layer", "intervention.projected=true",
                          "intervention.embedding=false"],
    "random_2_all": ["intervention=random_ablation", "intervention.k=2", "intervention.center=zero"],
    "random_3_all": ["intervention=random_ablation", "intervention.k=3", "intervention.center=zero"],
    "random_4_all": ["intervention=random_ablation", "intervention.k=4", "intervention.center=zero"],
}
#: Each method's matched random control (random_1_all is a control run of the controls step).
METHOD_CONTROLS = {"projected_ablation": "random_1_all", "projected_ablation_norm": "random_1_all",
                   "multi_ablation_2": "random_2_all", "multi_ablation_4": "random_4_all",
                   "second_direction_alone": "random_1_all", "rdo_direction": "random_1_all",
                   "rdo_cone_3": "random_3_all", "cosmic_ablation": "random_1_all", "heretic_per_layer": "random_1_all"}


def own_selection(overrides: list[str]) -> list[str]:
    """A method's overrides outside ``intervention.*`` (``layer=cosmic``): it ablates at another layer than the
    study's DiM pick, so where it lands is measured by a geometry run of its own, at that layer."""
    return [o for o in overrides if not o.startswith("intervention")]


def geometry_spec(overrides: list[str]) -> str:
    """``refusal.geometry``'s spec of a run's intervention overrides: [intervention=x, intervention.k=2] -> x:k=2."""
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("intervention="))
    return ":".join([name, *(o.split(".", 1)[1] for o in overrides if o.startswith("intervention."))])


#: Where each method and random control moves harmful activations, beside the unsteered model and DiM ablation.
METHOD_GEOMETRY_SPECS = ["none", "dim_ablation", *(geometry_spec(o) for o in [*METHODS.values(), CONTROLS["random_1_all"]]
                                                     if not own_selection(o))]
CURVE_ROWS = ["none", "dim_ablation", "inlp_nullspace", "inlp_flip"]  # the rows C1 and C2 compare
GEOMETRY_SPECS = ["none", "actadd:coeff=-1.0", "dim_ablation", "inlp_nullspace", "inlp_flip",
                  f"inlp_nullspace:k={LEGACY_K}", f"inlp_flip:k={LEGACY_K}", "dim_ablation:layers=selected",
                  "inlp_nullspace:layers=all", "inlp_flip:layers=all"]


def swept(key: str, values: list[Any]) -> str:
    """A multirun override over ``values``; one value as choice(v), or Hydra would apply it to the
    primary config (intervention=none, which has no such key) before the jobs choose their group."""
    joined = ",".join(map(str, values))
    return f"{key}={joined}" if len(values) > 1 else f"{key}=choice({joined})"


def model_order(model: str) -> tuple[int, str]:
    order = STUDY_MODELS + CONTROL_MODELS
    return (order.index(model) if model in order else len(order), model)

