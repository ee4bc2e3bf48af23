"""The Optuna Pareto search: the front's mathematics, lean trials, a real multi-objective search on the tiny
model through evaluate.py (real Hydra, real Optuna), and the errors a search gives before its first trial."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from refusal.errors import ConfigError
from refusal.evaluation import run_evaluation

SMALL = ["data.n_train=16", "data.n_val=8", "data.n_test=8", "eval.max_new_tokens=6", "fit.dim.n_prompts=4"]
NAN = float("nan")


# -- the front ------------------------------------------------------------------------------------------
def test_set_coverage_and_our_best_at_their_cost_at_the_boundaries():
    """C(a, b) counts b's points that some point of a is no worse than (equal points count); best_within takes the
    lowest refusal at KL at most the budget (equal KL counts), the lower KL on a refusal tie."""
    from refusal.report.pareto import best_within, set_coverage, weakly_dominates

    assert weakly_dominates((0.1, 1.0), (0.1, 1.0)) and not weakly_dominates((0.1, 1.0 + 1e-9), (0.1, 1.0))
    ours, theirs = [(0.1, 1.0), (0.3, 0.2)], [(0.1, 1.0), (0.3, 0.1), (0.5, 0.5)]
    assert set_coverage(ours, theirs) == pytest.approx(2 / 3)  # (0.3, 0.1) is cheaper than any point of ours
    assert set_coverage(theirs, ours) == 1.0  # (0.1, 1.0) equal; (0.3, 0.1) beats (0.3, 0.2)
    assert math.isnan(set_coverage(ours, [])) and set_coverage([], theirs) == 0.0
    assert best_within(ours, 1.0) == 0 and best_within(ours, 1.0 - 1e-9) == 1 and best_within(ours, 0.19) is None
    assert best_within([(0.2, 0.5), (0.2, 0.3), (NAN, 0.0), (None, 0.1)], 1.0) == 1  # tie: the lower KL; invalid skipped


def test_pareto_front_dominance_ties_and_duplicates():
    from refusal.report import dominates, pareto_front

    assert dominates((0.1, 1.0), (0.2, 1.0)) and dominates((0.1, 0.5), (0.2, 1.0))
    assert not dominates((0.1, 1.0), (0.1, 1.0))  # equal: neither dominates
    assert not dominates((0.1, 2.0), (0.2, 1.0)) and not dominates((0.2, 1.0), (0.1, 2.0))  # a trade-off
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 0.5)]) == [0]
    # (0.9, 0) baseline-like, (0.1, 2) strong, (0.4, 0.5) middle; (0.5, 0.6) and (0.9, 0.1) are dominated
    points = [(0.9, 0.0), (0.5, 0.6), (0.1, 2.0), (0.4, 0.5), (0.9, 0.1)]
    assert pareto_front(points) == [0, 2, 3]
    # duplicates of a front point both stay; a duplicate of a dominated point stays dominated
    assert pareto_front([(0.4, 0.5), (0.4, 0.5), (0.5, 0.6), (0.5, 0.6)]) == [0, 1]
    # a tie in one coordinate: the one better in the other dominates
    assert pareto_front([(0.0, 3.0), (0.0, 1.0), (1.0, 0.0)]) == [1, 2]
    # missing or non-finite coordinates are never on the front and dominate nothing
    assert pareto_front([(NAN, 0.0), (None, 0.0), (0.5, math.inf), (0.5, 1.0)]) == [3]
    # any dimension: a brute-force check on a grid with repeated values
    grid = [(a % 3, (a * 7) % 5, (a * 2) % 4) for a in range(30)]
    brute = [i for i, p in enumerate(grid)
             if not any(all(x <= y for x, y in zip(q, p, strict=True)) and q != p for q in grid)]
    assert pareto_front(grid) == brute


def _write_run(folder, name, model, intervention, params, refusal, kl, ppl=None):
    folder.mkdir(parents=True)
    metrics = {"harmful/refusal_rate": refusal, "harmless/kl_div": kl, "n_harmful": 32}
    if ppl is not None:
        metrics["harmless/perplexity"] = ppl
    (folder / "results.json").write_text(json.dumps({"status": "ok", "model": model, "intervention": intervention,
                                                     "params": params, "intervention_layer": 15, "metrics": metrics}))


def test_report_marks_the_front_per_model_across_interventions(tmp_path):
    from refusal.report import write_report

    runs = [("0_a_none", "a", "none", {}, 0.9, 0.0), ("1_a_actadd", "a", "actadd", {"coeff": -1.0}, 0.2, 0.8),
            ("2_a_inlp_flip", "a", "inlp_flip", {"k": 8, "alpha": 1.5}, 0.2, 0.3),  # beats actadd: same refusal, less KL
            ("3_a_inlp_flip", "a", "inlp_flip", {"k": 39, "alpha": 2.0}, 0.0, 1.4),
            ("4_a_inlp_nullspace", "a", "inlp_nullspace", {"k": 4}, 0.7, 0.5),  # dominated by flip k=8
            ("0_b_none", "b", "none", {}, 0.5, 0.0), ("1_b_actadd", "b", "actadd", {"coeff": -1.0}, 0.6, 5.0)]
    for run, *rest in runs:
        _write_run(tmp_path / run, run, *rest)
    report = write_report(tmp_path)
    md = report.markdown_path.read_text()
    front = md[md.index("## Pareto front"):]
    tables = {part.split("\n", 1)[0]: [line for line in part.splitlines() if line.startswith("| ") and "---" not in line][1:]
              for part in front.split("### ")[1:]}
    # a table per model, KL ascending; model b's actadd is worse than its baseline on both, so only b's none stays
    assert {m: [line.split(" | ")[-1].rstrip(" |") for line in t] for m, t in tables.items()} == {
        "a": ["0_a_none", "2_a_inlp_flip", "3_a_inlp_flip"], "b": ["0_b_none"]}
    assert "k=8, alpha=1.5" in tables["a"][1] and "20.0%" in tables["a"][1]
    import csv

    rows = {r["run"]: r["pareto"] for r in csv.DictReader(report.csv_path.open())}
    assert rows == {"0_a_none": "True", "1_a_actadd": "False", "2_a_inlp_flip": "True", "3_a_inlp_flip": "True",
                    "4_a_inlp_nullspace": "False", "0_b_none": "True", "1_b_actadd": "False"}
    assert (tmp_path / "pareto.png").stat().st_size > 10_000 and "![pareto](pareto.png)" in md
    assert not (tmp_path / "tradeoff.png").exists()  # lean trials have no perplexity: no empty perplexity plot


# -- lean trials ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, scope", [("none", []), ("actadd", []), ("inlp_flip", []),
                                         ("actadd", ["intervention.positions=post_instruction"]),
                                         ("inlp_flip", ["intervention.positions=prompt", "intervention.layers=all"])])
def test_a_lean_trial_measures_what_a_full_run_does_and_nothing_else(compose, tmp_path, name, scope):
    common = [f"intervention={name}", *scope, *SMALL, "geometry.enabled=true"]
    full = run_evaluation(compose(*common), tmp_path / "full")
    lean = run_evaluation(compose(*common, "eval=trial", "eval.max_new_tokens=6"), tmp_path / "lean")
    m, f = lean["metrics"], full["metrics"]
    assert lean["eval"] == "lean" and lean["status"] == "ok" and "geometry" not in lean
    assert not any(k.startswith(("overrefusal/", "harmless/perplexity", "harmless/refusal")) for k in m)
    # the same generations (cache) and the same next-token KL as the full run's teacher-forced pass at the
    # last prompt position: the lean pass computes one position instead of the whole completion, with the
    # shared chat-template prefix run once (position scopes edit the same tokens either way)
    assert m["harmful/refusal_rate"] == f["harmful/refusal_rate"] and m["harmful/refusal_score"] == f["harmful/refusal_score"]
    assert m["harmless/kl_div"] == pytest.approx(f["harmless/kl_div"], rel=2e-3, abs=1e-6)  # float tolerance
    assert (m["harmless/kl_div"] == 0.0) == (name == "none")
    if name != "none":  # the paired difference from the baseline, as in a full run
        assert m["harmful/mcnemar_p_vs_baseline"] == f["harmful/mcnemar_p_vs_baseline"]
        assert m["harmful/refusal_rate_vs_baseline_ci95"] == f["harmful/refusal_rate_vs_baseline_ci95"]
    rows = [json.loads(line) for line in (tmp_path / "lean" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["split"] for r in rows} == {"harmful"}
    assert not list((tmp_path / "lean").glob("wandb"))  # logger=none: no W&B run


def test_objectives_are_the_named_metrics_in_order():
    from refusal.evaluation.trial import objectives

    results = {"metrics": {"harmful/refusal_rate": 0.25, "harmless/kl_div": 0.5, "warning": "x", "judge_ok": True}}
    assert objectives(results, None) is None and objectives(results, []) is None
    assert objectives(results, ["harmless/kl_div", "harmful/refusal_rate"]) == [0.5, 0.25]
    assert objectives(results, ["harmful/refusal_rate"]) == 0.25  # a single objective is a float for Optuna
    with pytest.raises(ConfigError, match=r"names \['harmless/perplexity'\], which this run did not measure"):
        objectives(results, ["harmful/refusal_rate", "harmless/perplexity"])


# -- the search, end to end -------------------------------------------------------------------------------
def run_cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_optuna_search_on_tiny_writes_the_front(tmp_path):
    from refusal.report import pareto_front

    sweep = tmp_path / "sweep"
    common = ["model=tiny", *SMALL, f"cache_dir={tmp_path / 'cache'}", f"artifacts_dir={tmp_path / 'art'}",
              "progress=false", f"hydra.sweep.dir={sweep}"]
    # the baseline as a lean run in the same folder (the front spans every run there), then a 3-trial search
    proc = run_cli("-m", "intervention=none", "eval=trial", "logger=none", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("experiment=pareto_actadd", "intervention.layer=int(interval(1,3))", "hydra.sweeper.n_trials=3",
                   "eval.max_new_tokens=6", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "setup plugin alembic" not in proc.stdout + proc.stderr  # optuna's storage layer kept quiet
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*_tiny_actadd/results.json"))]
    assert len(trials) == 3 and all(t["status"] == "ok" and t["eval"] == "lean" for t in trials)
    for t in trials:  # each suggestion reached the job as an override, inside the searched ranges
        assert -2.0 <= t["params"]["coeff"] <= 0.0 and 1 <= t["params"]["layer"] <= 3
        assert t["intervention_layer"] == t["params"]["layer"] and t["scope"]["layers"] == [t["params"]["layer"]]
        assert t["optimize"] == ["harmful/refusal_rate", "harmless/kl_div"] and "harmless/perplexity" not in t["metrics"]
    assert len({t["params"]["coeff"] for t in trials}) == 3
    assert [t["model_reused"] for t in trials] == [False, True, True]  # one model load for the whole search
    # Optuna's own Pareto front of the trials (from the values each job returned) is ours over the same trials
    solutions = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    points = [(t["metrics"]["harmful/refusal_rate"], t["metrics"]["harmless/kl_div"]) for t in trials]
    assert sorted(tuple(s["values"]) for s in solutions) == sorted(points[i] for i in pareto_front(points))
    # the report: the front over all four runs (baseline included), as a table, a CSV column and on the plot
    import csv

    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 4
    everything = [(float(r["harmful/refusal_rate"]), float(r["harmless/kl_div"])) for r in rows]
    expected = {rows[i]["run"] for i in pareto_front(everything)}
    assert {r["run"] for r in rows if r["pareto"] == "True"} == expected and "0_tiny_none" in expected  # KL 0
    md = (sweep / "report.md").read_text()
    front = md[md.index("## Pareto front"):]
    assert sorted(expected) == sorted(line.split(" | ")[-1].rstrip(" |") for line in front.splitlines()
                                      if line.startswith("| ") and "_tiny_" in line)
    assert md.count("| tiny |") == 4  # the main table: one row per run (the front's tables are per model)
    assert (sweep / "pareto.png").stat().st_size > 10_000


#: heretic 1.4.0's search space (heretic/main.py, ``objective``) in its own units: what pareto_weighted_ablation samples.
HERETIC_RANGES = {"direction_index": (0.4, 0.9), "max_weight": (0.8, 1.5), "max_weight_position": (0.6, 1.0),
                  "min_weight": (0.0, 1.0), "min_weight_distance": (0.04, 0.6)}


def test_the_heretic_kernel_search_samples_heretics_space_with_heretics_fixed_choices(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("experiment=pareto_weighted_ablation", "hydra.sweeper.n_trials=2", "model=tiny", *SMALL,
                   f"cache_dir={tmp_path / 'cache'}", f"artifacts_dir={tmp_path / 'art'}", "progress=false",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*_tiny_weighted_ablation/results.json"))]
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)
    for params in (t["params"] for t in trials):
        assert params["direction"] in ("index", "per_layer")
        assert {k: params[k] for k in ("units", "projected", "embedding", "norm_preserving")} == \
            {"units": "fractions", "projected": True, "embedding": False, "norm_preserving": "rows"}
        for name, (low, high) in HERETIC_RANGES.items():
            for key in [name] if name == "direction_index" else [f"attn_{name}", f"mlp_{name}"]:
                assert low <= params[key] <= high, (key, params[key])
    assert trials[0]["params"] != trials[1]["params"]


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("overrides, message", [
    (["experiment=pareto_actadd", "intervention.alpha=interval(0.5,2.0)"],  # actadd has no alpha
     "error: the search varies intervention.alpha, which is not a parameter of intervention 'actadd' "
     "(its parameters: coeff, layer, layers, positions); search one of those"),
    (["experiment=pareto_actadd"],  # the experiment's qwen05 layer range on the 4-layer tiny model
     "error: the search range intervention.layer=int(interval(6, 18)) reaches intervention.layer=6, which fails: "
     "intervention.layer=6 is out of range for a model with 4 layers (use 0..3, or null for the DiM layer)"),
    (["experiment=pareto_inlp_flip", "intervention.layer=null", "intervention.alpha=interval(0.5,inf)"],
     "error: the search range intervention.alpha=interval(0.5,inf) reaches intervention.alpha=inf, which fails: "
     "intervention.alpha must be a finite number, got inf"),
    (["experiment=pareto_inlp_flip", "intervention.layer=null", "intervention.k=choice(2,999)"],
     "error: the search range intervention.k=choice(2,999) reaches intervention.k=999, which fails: "
     "intervention.k=999 exceeds fit.inlp.n_iterations=300, the most directions INLP can fit; lower intervention.k "
     "or raise fit.inlp.n_iterations"),
    (["experiment=pareto_actadd", "intervention.layer=null", "hydra.sweeper.direction=[minimize]"],
     "error: eval.optimize lists 2 metrics but hydra.sweeper.direction has 1; give one direction per metric, e.g. "
     "eval.optimize=[harmful/refusal_rate,harmless/kl_div] 'hydra.sweeper.direction=[minimize,minimize]'"),
    (["experiment=pareto_actadd", "intervention.layer=null", "eval.optimize=[harmful/refusal_rate,capability/mmlu/accuracy]"],
     "error: eval.optimize names ['capability/mmlu/accuracy'], which a lean trial (eval=trial) does not measure: it reports "
     "harmful/* (refusal), harmless/kl_div and capability/<task>/* of the tasks in eval.capability.tasks; add the task "
     "there, or drop eval=trial for the full metrics"),
])
def test_a_search_that_cannot_work_is_one_line_before_the_first_trial(tmp_path, overrides, message):
    # the same checks as a command-line value (intervention.layer=6, intervention.alpha=inf...), on every end
    # of every range, before any trial loads the model
    sweep = tmp_path / "sweep"
    proc = run_cli(*overrides, "model=tiny", f"cache_dir={tmp_path / 'cache'}", f"artifacts_dir={tmp_path / 'art'}",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _error_lines(proc) == [message] and "Traceback" not in proc.stderr
    assert not list(sweep.glob("*/results.json")) and not (tmp_path / "cache").exists()  # no trial, no model


def test_optuna_sql_storage_works_with_the_pinned_sqlalchemy(tmp_path):
    # hydra.sweeper.storage=sqlite:///... (a search that resumes): optuna 2.10's schema check needs SQLAlchemy < 2
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(directions=["minimize", "minimize"], storage=storage, study_name="s")
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1 - t.params["x"] ** 2), n_trials=3)
    again = optuna.load_study(study_name="s", storage=storage)
    assert len(again.trials) == 3 and 1 <= len(again.best_trials) <= 3


# -- capability in the search: a third objective and a constraint on the front ---------------------------
def test_constraints_parse_meet_their_bound_and_refuse_bad_entries():
    from refusal.constraints import Constraint, feasible, parse_constraints

    (c,) = parse_constraints(["capability/mmlu/accuracy_vs_baseline >= -0.01"])
    assert c == Constraint("capability/mmlu/accuracy_vs_baseline", ">=", -0.01)
    assert c.met(-0.01) and c.met(0.0) and not c.met(-0.0101) and not c.met(NAN)  # the bound itself is met
    (upper,) = parse_constraints(["harmless/kl_div<=1e-1"])
    assert upper.met(0.1) and not upper.met(0.1000001)
    assert feasible({"capability/mmlu/accuracy_vs_baseline": -0.005}, [c]) and not feasible({}, [c])  # unmeasured fails
    assert parse_constraints(None) == [] and parse_constraints([]) == []
    for bad in (["capability/mmlu/accuracy_vs_baseline > -0.01"], ["mmlu drop <= 1 point"], [3]):
        with pytest.raises(ConfigError, match=r"is not '<metric> >= <number>' or '<metric> <= <number>', e.g. eval.constraints="):
            parse_constraints(bad)
    with pytest.raises(ConfigError, match="must be a list of strings"):
        parse_constraints("harmless/kl_div <= 1")


def test_a_run_that_misses_its_constraint_is_off_the_front_and_dominates_nothing():
    from refusal.report import mark_front

    rows = [{"model": "a", "harmful/refusal_rate": 0.9, "harmless/kl_div": 0.0, "feasible": True},
            {"model": "a", "harmful/refusal_rate": 0.1, "harmless/kl_div": 0.1, "feasible": False},  # best, but lost MMLU
            {"model": "a", "harmful/refusal_rate": 0.2, "harmless/kl_div": 0.2, "feasible": True},  # dominated only by it
            {"model": "a", "harmful/refusal_rate": 0.5, "harmless/kl_div": 0.3}]  # no constraints: feasible
    mark_front(rows)
    assert [r["pareto"] for r in rows] == [True, False, True, False]


def test_a_capability_constraint_needs_its_task(compose):
    from refusal.config import check_config

    with pytest.raises(ConfigError, match=r"eval.constraints has 'capability/mmlu/accuracy_vs_baseline >= -0.01', but 'mmlu' "
                                          r"is not in eval.capability.tasks \(\[\]\); add it, e.g. eval.capability.tasks=\[mmlu\]"):
        check_config(compose("eval.constraints=['capability/mmlu/accuracy_vs_baseline >= -0.01']"))


def test_optuna_search_with_capability_as_third_objective_and_constraint(tmp_path):
    """A real 3-objective search on tiny: each lean trial measures MMLU (fixture files in the wheel's format)
    under its intervention, returns [refusal, KL, Δ MMLU accuracy] to Optuna, records whether it met
    'Δ MMLU ≥ −1 point', and the report's front holds only the runs that did."""
    from test_capability import write_fixture

    from refusal.report import pareto_front

    write_fixture(tmp_path / "cache")
    sweep = tmp_path / "sweep"
    key = "capability/mmlu/accuracy_vs_baseline"
    common = ["model=tiny", *SMALL, f"cache_dir={tmp_path / 'cache'}", f"artifacts_dir={tmp_path / 'art'}", "progress=false",
              f"hydra.sweep.dir={sweep}", "eval.capability.tasks=[mmlu]", "eval.capability.mmlu_subjects=[anatomy]",
              "eval.capability.mmlu_per_subject=6", f"eval.constraints=['{key} >= -0.01']"]
    proc = run_cli("experiment=pareto_actadd", "intervention.layer=int(interval(1,3))", "intervention.coeff=interval(-400.0,400.0)", "intervention.layers=all",
                   "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.n_startup_trials=4", "eval.max_new_tokens=4",
                   f"eval.optimize=[harmful/refusal_rate,harmless/kl_div,{key}]", "hydra.sweeper.direction=[minimize,minimize,maximize]",
                   *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*_tiny_actadd/results.json"))]
    assert len(trials) == 4 and all(t["eval"] == "lean" and t["constraints"] == [f"{key} >= -0.01"] for t in trials)
    for t in trials:
        m = t["metrics"]
        assert m[f"{key}"] == pytest.approx(m["capability/mmlu/accuracy"] - m["capability/mmlu/baseline_accuracy"])
        assert m["feasible"] == (m[key] >= -0.01) and t["capability"]["tasks"]["mmlu"]["n"] == 6
    solutions = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["solutions"]
    assert all(len(s["values"]) == 3 for s in solutions)  # the third objective reached Optuna
    returned = {tuple(t["metrics"][k] for k in ("harmful/refusal_rate", "harmless/kl_div", key)) for t in trials}
    assert {tuple(s["values"]) for s in solutions} <= returned
    import csv

    rows = list(csv.DictReader((sweep / "report.csv").open()))
    ok = [(float(r["harmful/refusal_rate"]), float(r["harmless/kl_div"])) if r["feasible"] == "True" else (None, None) for r in rows]
    assert {r["run"] for r in rows if r["pareto"] == "True"} == {rows[i]["run"] for i in pareto_front(ok)}
    assert "that met its constraints (capability/mmlu/accuracy_vs_baseline >= -0.01)" in (sweep / "report.md").read_text()
