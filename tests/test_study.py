"""The study's report (bench/studykit): docs/RESULTS.md rendered from planted study folders, its sections
and figures. Nothing is run."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from refusal.artifacts import save_artifact
from refusal.errors import DataError
from refusal.metrics import wilson_interval
from refusal.stats.paired import PairedDifference

sys.path.insert(0, str(REPO / "bench"))  # the study's code lives in bench/studykit
from studykit.plan import CONTROLS, KS, METHODS  # noqa: E402
from studykit.plots import plot_tunability  # noqa: E402
from studykit.progress import estimate, render_plan  # noqa: E402
from studykit.render import holm_table, machines, render, timing_line  # noqa: E402
from studykit.run import Study  # noqa: E402
from studykit.runs import ModelRuns, _rows  # noqa: E402
from studykit.sections import judges_section, primary_note, selection_section  # noqa: E402
from studykit.verdict import RULES, decide  # noqa: E402
from studykit.verdict_sections import (  # noqa: E402
    control_pairs,
    more_directions_add,
    numerics_section,
    second_direction_alone_says,
)

N = 40  # harmful (and harmless) test prompts of every planted run


def write_run(folder, intervention: str, refused: int, ppl: float = 2.0, base: int = 30, **params) -> None:
    """A run folder as evaluate.py writes it (results.json, completions.jsonl), with planted outcomes."""
    folder.mkdir(parents=True)
    harmful = [{"split": "harmful", "prompt": f"harmful {i}", "refused": i < refused, "baseline_refused": i < base}
               for i in range(N)]
    harmless = [{"split": "harmless", "prompt": f"harmless {i}", "refused": False, "baseline_refused": False,
                 "nll": 5 * math.log(ppl), "tokens": 5, "kl_div": 0.0 if intervention == "none" else 0.01,
                 "kl_div_completion": 0.0, "baseline_nll": 5 * math.log(2.0)} for i in range(N)]
    (folder / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harmful + harmless))
    (folder / "results.json").write_text(json.dumps({
        "status": "ok", "model": folder.parts[-3], "intervention": intervention, "params": params, "intervention_layer": 10,
        "metrics": {"harmful/refusal_rate": refused / N, "harmful/refusal_rate_ci95": list(wilson_interval(refused, N)),
                    "harmless/refusal_rate": 0.0, "harmless/refusal_rate_ci95": [0.0, 0.1], "harmless/perplexity": ppl,
                    "harmless/kl_div": 0.01, "n_harmful": N}}))


def test_the_study_renders_its_verdict_from_the_records_it_writes(tmp_path):
    """The study's render on planted study records: qwen05 where C1-C3 hold, qwen15 where ablation and
    full-rank flip do not suppress (C1, C3 not applicable). Nothing is run."""
    rank = 40
    plans = {"qwen05": {"abl": 2, "flip": 1, "null": 25, "ks": {1: 28, 2: 25, 4: 20, 6: 10, 8: 6, 12: 1, 16: 1, 24: 1}},
             "qwen15": {"abl": 29, "flip": 29, "null": 30, "ks": dict.fromkeys(KS, 30)}}
    for model, plan in plans.items():
        mdir = tmp_path / "study" / model
        (mdir / "train").mkdir(parents=True)
        (mdir / "train" / "fitted.json").write_text(json.dumps({"inlp_rank": rank, "layer": 10, "n_layers": 24, "position": -1}))
        write_run(mdir / "main" / "0", "none", 30)
        write_run(mdir / "main" / "1", "dim_ablation", plan["abl"])
        write_run(mdir / "main" / "2", "inlp_flip", plan["flip"], k=rank)
        write_run(mdir / "main" / "3", "inlp_nullspace", plan["null"], k=rank)
        for i, (k, refused) in enumerate(plan["ks"].items()):
            write_run(mdir / "k" / f"f{i}", "inlp_flip", refused, k=k)
            write_run(mdir / "k" / f"n{i}", "inlp_nullspace", 30, k=k)
        (mdir / "k" / "report.csv").write_text("")  # the sweep has ended
    assert len([k for k in KS if k < 15]) + 1 >= 6  # the grid reaches C3's 6 values even at the smallest rank
    meta = {"date": "2026-12-02", "hardware": "planted", "data": "planted records", "max_new_tokens": 24,
            "token_budget": 128, "models": list(plans)}
    text = render(tmp_path / "study", tmp_path / "docs", meta).read_text()
    table = text[text.index("### Converged INLP"):].split("\n\n")[1].splitlines()
    c1_row, c2_row, c3_row, c4_row = table[2:6]
    assert c1_row.count("**holds**") == 1 and "**not applicable**" in c1_row and "ablation does not suppress" in c1_row
    assert "**holds**" in c2_row
    assert c3_row.count("**holds**") == 1 and "**not applicable**" in c3_row and "k=12: share 100.0% [100.0%, 100.0%]" in c3_row
    assert c4_row.count("**inconclusive**") == 2  # no geometry step in these records
    assert RULES in text  # the rules are written before the numbers
    assert text.index("Rules (applied by") < text.index("### Converged INLP")
    with pytest.raises(DataError, match="differ .* paired statistics need the same prompts"):  # a k run made on other prompts is refused
        write_run(tmp_path / "study" / "qwen05" / "k" / "zz", "inlp_flip", 5, k=3)
        rows = (tmp_path / "study" / "qwen05" / "k" / "zz" / "completions.jsonl")
        rows.write_text(rows.read_text().replace('"harmful 0"', '"another prompt"'))
        decide(ModelRuns(tmp_path / "study" / "qwen05").inputs())


def test_the_studys_tables_show_mcnemar_p_holm_adjusted_over_each_models_runs_in_that_table():
    """Holm by hand: model a's raw p 0.01, 0.04, 0.03 -> 0.03, 0.06, 0.06 (0.03·2 carried up to 0.04's row); model
    b's single run keeps its p. The rows themselves are not changed (a row shown in two tables gets each family's p)."""
    def row(model, p):
        return {"model": model, "intervention": "inlp_flip", "params": "-", "harmful/mcnemar_p_vs_baseline": p}
    rows = [row("a", 0.01), row("a", 0.04), row("a", 0.03), row("b", 0.2), {"model": "a", "intervention": "none", "params": "-"}]
    lines = holm_table(rows).splitlines()
    column = lines[0].split(" | ").index("McNemar p (Holm)")
    assert [line.split(" | ")[column] for line in lines[2:]] == ["0.03", "0.06", "0.06", "0.2", "-"]
    assert all("harmful/mcnemar_p_vs_baseline_holm" not in r for r in rows)


def planted_control_pair(tmp_path) -> Path:
    """A study folder where DiM ablation refuses 2 of 40 at perplexity 2.2, the random direction at the same reach
    (its control) 30 of 40 at 2.0."""
    mdir = tmp_path / "study" / "qwen05"
    (mdir / "train").mkdir(parents=True)
    (mdir / "train" / "fitted.json").write_text(json.dumps({"inlp_rank": 8, "layer": 10}))
    write_run(mdir / "main" / "0", "none", 30)
    write_run(mdir / "main" / "1", "dim_ablation", 2, ppl=2.2)
    write_run(mdir / "controls" / "random_1_all", "random_ablation", 30, ppl=2.0, k=1)
    return mdir


def test_each_control_is_paired_with_the_run_it_differs_from_in_one_respect(tmp_path):
    """Planted: DiM ablation refuses 2 of 40, the random direction at the same reach 30 (Δ −70.0 points, exactly
    [−28 of 40] on every prompt pair); perplexities 2.2 and 2.0 on the same completions give ×1.100 with a zero-width
    interval. A pair whose other run is missing is left out."""
    mdir = planted_control_pair(tmp_path)
    lines = control_pairs({"qwen05": ModelRuns(mdir)})
    rows = [line for line in lines if line.startswith("| DiM's direction")]
    assert len(rows) == 1 and len([line for line in lines if line.startswith("| ") and "---" not in line]) == 2
    cells = rows[0].split(" | ")
    assert cells[1:3] == ["dim_ablation", "random_1_all"] and cells[5].startswith("-70.0 [")
    assert cells[6] == "×1.100 [1.100, 1.100] |"


def test_a_control_pair_pairs_perplexity_only_where_both_runs_scored_the_same_unsteered_text(tmp_path):
    """Planted: the control regenerated its unsteered baselines and got other text on 3 of 40 harmless prompts, where
    its perplexity is also ×50. Those 3 are left out (the ratio stays ×1.100, not pulled up by them) and the cell says
    on how many prompts it was paired."""
    mdir = planted_control_pair(tmp_path)
    for folder, other_text in ((mdir / "main" / "1", set()), (mdir / "controls" / "random_1_all", {0, 1, 2})):
        rows = [json.loads(line) for line in (folder / "completions.jsonl").read_text().splitlines()]
        for row in rows:
            i = int(row["prompt"].split()[-1])
            if row["split"] == "harmless":
                row["baseline_completion"] = f"text {i}" + (" (other batch mix)" if i in other_text else "")
                row["nll"] += 5 * math.log(50) if i in other_text else 0.0
        (folder / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    [row] = [line for line in control_pairs({"qwen05": ModelRuns(mdir)}) if line.startswith("| DiM's direction")]
    assert row.split(" | ")[6] == "×1.100 [1.100, 1.100] on the 37 of 40 prompts whose unsteered text both scored |"


def test_a_study_committed_under_one_folder_resumes_under_another_and_stamps_no_machine_path(tmp_path):
    """study/ is committed: a step done on one machine is skipped on another checkout, not redone or refused."""
    splits = tmp_path / "splits"
    splits.mkdir()
    ran = tmp_path / "ran.txt"
    write_done = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('x'); open(sys.argv[2], 'a').write('.')"

    def step(root):
        study = Study(root, [], splits)
        done = root / "qwen05" / "main" / "report.csv"
        done.parent.mkdir(parents=True, exist_ok=True)
        return study.run(["-c", write_done, str(done), str(ran), f"data.dir={splits}"], root / "qwen05" / "main.log", done)

    assert step(tmp_path / "a" / "study") and ran.read_text() == "."
    stamp = (tmp_path / "a" / "study" / "qwen05" / "main.command").read_text()
    assert str(tmp_path / "a") not in stamp and str(splits) not in stamp and "$STUDY/qwen05/main/report.csv" in stamp and "data.dir=$SPLITS" in stamp
    shutil.copytree(tmp_path / "a" / "study", tmp_path / "b" / "study")
    assert step(tmp_path / "b" / "study") and ran.read_text() == "."  # skipped: the command did not run again
    other = Study(tmp_path / "b" / "study", [], splits)  # the same output made by another command is refused
    with pytest.raises(SystemExit, match="made by another command"):
        other.run(["-c", "pass"], tmp_path / "b" / "study" / "qwen05" / "main.log", tmp_path / "b" / "study" / "qwen05" / "main" / "report.csv")


def test_a_finished_step_leaves_its_per_prompt_records_archived_and_the_study_reads_them(tmp_path):
    """study/ is committed: a step's completions.jsonl are gzipped when it succeeds (a failed one keeps them plain,
    for its resume), and the report reads the archived rows as it read the plain ones."""
    root = tmp_path / "study"
    write_run(root / "qwen05" / "main" / "0", "none", 30)
    write_run(root / "qwen05" / "main" / "1", "dim_ablation", 2)
    before = [r["outcomes"].refused["harmful"].sum() for r in _rows(root / "qwen05" / "main")]
    fail = root / "qwen05" / "k" / "report.csv"
    write_run(fail.parent / "0", "none", 30)
    assert not Study(root, [], tmp_path).run(["-c", "raise SystemExit(3)"], root / "qwen05" / "k.log", fail)
    assert (fail.parent / "0" / "completions.jsonl").exists()
    done = root / "qwen05" / "main" / "report.csv"
    assert Study(root, [], tmp_path).run(["-c", f"open({str(done)!r}, 'w').write('x')"], root / "qwen05" / "main.log", done)
    assert sorted(p.name for p in done.parent.rglob("completions.jsonl*")) == ["completions.jsonl.gz"] * 2
    assert [r["outcomes"].refused["harmful"].sum() for r in _rows(done.parent)] == before == [30, 2]


def test_a_step_records_its_cpu_time_apart_from_its_wall_time_and_the_report_shows_both(tmp_path):
    """A step that waits (as a paused one does) reads long on the wall, not in CPU time; older bare entries are wall."""
    root = tmp_path / "study"
    done = root / "qwen05" / "main" / "report.csv"
    spin_then_wait = ("import pathlib, sys, time; t = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
                      "time.sleep(0.6); pathlib.Path(sys.argv[1]).parent.mkdir(parents=True); pathlib.Path(sys.argv[1]).write_text('x')")
    assert Study(root, [], tmp_path).run(["-c", spin_then_wait, str(done)], root / "qwen05" / "main.log", done)
    entry = json.loads((root / "qwen05" / "timings.json").read_text())["main.log"]
    assert 0.3 <= entry["cpu_s"] + 0.05 and entry["cpu_s"] < 0.8 < entry["wall_s"]
    line = timing_line("qwen05", {"train.log": 60.0, "main.log": {"wall_s": 600.0, "cpu_s": 1080.0}})
    assert line.startswith("Wall time, qwen05: 11 min in all") and "`train` 1.0" in line and "`main` 10.0 [18.0]" in line and "CPU minutes" in line
    assert "CPU" not in timing_line("qwen05", {"train.log": 60.0})


def test_a_resumed_step_appends_to_its_log_and_its_time_is_the_sum_of_its_segments(tmp_path):
    """A step stopped part way (here: failing) resumes from its caches: its log keeps the first segment's output and
    timings.json the sum of both segments; a step that finished is not summed into when its command runs afresh."""
    root = tmp_path / "study"
    done = root / "qwen05" / "pareto" / "report.csv"
    log = root / "qwen05" / "pareto.log"
    # the first segment leaves a cache and stops; the second finds the cache and finishes
    segment = ("import pathlib, sys, time; done = pathlib.Path(sys.argv[1]); cache = done.parent / 'cache'\n"
               "t = time.process_time()\nwhile time.process_time() - t < 0.2: pass\n"
               "if not cache.exists(): done.parent.mkdir(parents=True); cache.write_text('x'); print('first'); sys.exit(1)\n"
               "print('second'); done.write_text('x')")
    study = Study(root, [], tmp_path)
    assert not study.run(["-c", segment, str(done)], log, done)
    first = json.loads((root / "qwen05" / "timings.json").read_text())["pareto.log"]
    assert first["stopped"] and "segments" not in first
    assert "(stopped, not finished)" in timing_line("qwen05", {"pareto.log": first})
    assert study.run(["-c", segment, str(done)], log, done)
    both = json.loads((root / "qwen05" / "timings.json").read_text())["pareto.log"]
    assert both["segments"] == 2 and "stopped" not in both
    assert both["wall_s"] >= first["wall_s"] + 0.2 and both["cpu_s"] >= first["cpu_s"] + 0.15
    assert log.read_text().split("--- resumed")[0].strip() == "first" and log.read_text().rstrip().endswith("second")
    assert timing_line("qwen05", {"pareto.log": both}).endswith(f"[{both['cpu_s'] / 60:.1f}] in 2 segments).")
    # finished, its output deleted and the same command run again: a new measurement, not a third segment
    shutil.rmtree(done.parent)
    assert not study.run(["-c", segment, str(done)], log, done)
    assert "segments" not in json.loads((root / "qwen05" / "timings.json").read_text())["pareto.log"]


def test_a_step_stopped_by_ctrl_c_records_its_time_as_stopped_and_stops_the_study(tmp_path):
    """Ctrl-C (SIGINT) during a step: the step's process is ended, its segment's time is kept (marked stopped, for
    the resume to add to) and the interrupt goes on to stop the study."""
    root = tmp_path / "study"
    done = root / "qwen05" / "main" / "report.csv"

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            Study(root, [], tmp_path).run(["-c", "while True: pass"], root / "qwen05" / "main.log", done)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    entry = json.loads((root / "qwen05" / "timings.json").read_text())["main.log"]
    assert entry["stopped"] and 0.5 <= entry["wall_s"] < 30
    assert entry["cpu_s"] >= 0.2  # the stopped process's CPU counts: it was reaped before its time was read


def test_a_study_started_in_the_background_stops_on_sigterm_and_sigint_and_records_the_step(tmp_path):
    """``nohup python bench/study.py ... &`` starts with SIGINT ignored, and SIGTERM's default ends the driver
    unrecorded while its step runs on: with stop_on_signals both stop the step as Ctrl-C does."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        root = tmp_path / sig.name / "study"
        script = ("import signal, sys; from pathlib import Path; sys.path.insert(0, sys.argv[2])\n"
                  "from studykit.run import Study; from refusal.app.signals import stop_on_signals\n"
                  "signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job starts\n"
                  "stop_on_signals(); root = Path(sys.argv[1])\n"
                  "try:\n"
                  "    Study(root, [], root).run(['-c', 'import time; print(\"started\", flush=True); time.sleep(60)'], "
                  "root / 'qwen05' / 'main.log', root / 'qwen05' / 'main' / 'report.csv')\n"
                  "except KeyboardInterrupt:\n"
                  "    sys.exit(130)\n")
        driver = subprocess.Popen([sys.executable, "-c", script, str(root), str(REPO / "bench")], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        log = root / "qwen05" / "main.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and "started" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        driver.send_signal(sig)
        assert driver.wait(timeout=30) == 130
        entry = json.loads((root / "qwen05" / "timings.json").read_text())["main.log"]
        assert entry["stopped"] and entry["wall_s"] < 30


def test_the_selection_table_reads_the_fit_committed_with_the_study_and_counts_each_rules_passing_candidates(tmp_path):
    # scores planted by hand ([layer, position]): KL passes everywhere it was scored; the relative rule (induce >=
    # unsteered harmless -4) keeps 4 of the 5 scored candidates and picks the lowest bypass among them, L0P-1;
    # Arditi's absolute rule (induce >= 0) keeps 2 and picks L1P-2
    root = tmp_path / "study"
    nan = float("nan")
    tensors = {"direction": torch.zeros(3, 2, 4), "bypass": torch.tensor([[-1.0, -3.0], [-2.0, -0.5], [-9.0, nan]]),
               "induce": torch.tensor([[-3.0, -3.5], [0.5, 1.0], [-5.0, nan]]),
               "kl": torch.tensor([[0.05, 0.05], [0.05, 0.05], [0.05, nan]])}
    meta = {"layer": 0, "position": -1, "baseline_harmful_score": 2.0, "baseline_harmless_score": -4.0,
            "passed_filters": True, "selection": {"max_kl": 0.1, "min_induce": 0.0},
            "refusal_filter": {"harmful_train": {"kept": 41, "of": 128}}}
    save_artifact(root / "artifacts" / "qwen05" / "fitA" / "dim_auto-1", tensors, meta)
    (root / "qwen05" / "train").mkdir(parents=True)
    # as the train step records it on the machine it ran on: the copy under study/artifacts is what is read
    (root / "qwen05" / "train" / "fitted.json").write_text(json.dumps({"artifact_dir": "/elsewhere/artifacts/qwen05/fitA"}))
    lines = selection_section({"qwen05": ModelRuns(root / "qwen05")}, root)
    assert "| qwen05 | L15P-1 | L0P-1 (4 of 5 pass) | L1P-2 (2 of 5 pass) | -4.00 | harmful train 41/128 |" in lines
    (root / "qwen05" / "train" / "fitted.json").write_text(json.dumps({"artifact_dir": "artifacts/qwen05/missing"}))
    assert selection_section({"qwen05": ModelRuns(root / "qwen05")}, root) == []  # no fit found: no table, no guess


def test_a_k_sweep_still_running_decides_nothing_and_is_listed_as_running(tmp_path):
    mdir = tmp_path / "study" / "qwen05"
    (mdir / "train").mkdir(parents=True)
    (mdir / "train" / "fitted.json").write_text(json.dumps({"inlp_rank": 16, "layer": 10, "n_layers": 24, "position": -1}))
    for i, (name, refused) in enumerate([("none", 30), ("dim_ablation", 2), ("inlp_flip", 1), ("inlp_nullspace", 25)]):
        write_run(mdir / "main" / str(i), name, refused, **({"k": 16} if name.startswith("inlp") else {}))
    (mdir / "main" / "report.csv").write_text("")
    for i, k in enumerate((1, 2, 4, 6, 8)):  # five of six jobs done, no report yet
        write_run(mdir / "k" / str(i), "inlp_flip", 1, k=k)
    meta = {"date": "2026-12-02", "hardware": "planted", "data": "planted", "max_new_tokens": 128, "models": ["qwen05"]}
    text = render(tmp_path / "study", tmp_path / "docs", meta).read_text()
    assert "`k` (running: 5 jobs done)" in text
    assert "## Tunability" not in text  # no swept rows yet: the main table is not repeated
    c3 = next(line for line in text.splitlines() if line.startswith("| C3"))
    assert "**holds**" not in c3 and "only 1 k values" in c3  # the jobs done so far decide nothing
    (mdir / "k" / "report.csv").write_text("")  # the sweep ends
    text = render(tmp_path / "study", tmp_path / "docs", meta).read_text()
    assert "running:" not in text and "`k`" not in text.split("## Verdict")[0]
    assert "**holds**" in next(line for line in text.splitlines() if line.startswith("| C3"))
    assert "## Tunability" in text and "k=6" in text.split("## Tunability")[1]
    # a step of named runs: its finished runs are shown and it is listed as partial until every planned run exists
    write_run(mdir / "controls" / "dim_ablation_selected", "dim_ablation", 3)
    text = render(tmp_path / "study", tmp_path / "docs", meta).read_text()
    assert f"`controls` (1 of {len(CONTROLS)} runs done)" in text.split("## Verdict")[0]
    assert "| qwen05 | dim_ablation | dim_ablation_selected: " in text.split("\n## Controls\n")[1]  # named by its control
    for name in list(CONTROLS)[1:]:
        write_run(mdir / "controls" / name, "dim_ablation", 3)
    assert "`controls`" not in render(tmp_path / "study", tmp_path / "docs", meta).read_text().split("## Verdict")[0]


def test_the_study_renders_the_length_curve_with_a_verdict_per_budget(tmp_path):
    """Planted main rows at 128 tokens and the curve's rows at 32, 128 and 256 (cuts of one generation): ablation
    suppresses only from 128 on, so C1 is not applicable at 32 and holds at 128 and 256; the curve shows its own 128
    point (ablation refuses 3 of 40 where the main rows refused 2), checked against the main rows; the plot is written."""
    mdir = tmp_path / "study" / "qwen05"
    (mdir / "train").mkdir(parents=True)
    (mdir / "train" / "fitted.json").write_text(json.dumps({"inlp_rank": 40, "layer": 10, "n_layers": 24, "position": -1}))
    for folder, abl in ((mdir / "main", 2), (mdir / "tokens" / "32", 30), (mdir / "tokens" / "128", 3), (mdir / "tokens" / "256", 1),
                        (mdir / "numerics", 4)):
        for i, (name, refused) in enumerate((("none", 30), ("dim_ablation", abl), ("inlp_flip", 1), ("inlp_nullspace", 25))):
            write_run(folder / str(i), name, refused, **({"k": 40} if name.startswith("inlp") else {}))
    for name, refused in (("multi_ablation_2", 2), ("multi_ablation_4", 1), ("random_2_all", 30), ("projected_ablation", 2)):
        write_run(mdir / "methods" / name, name.rsplit("_", 1)[0], refused)
    write_run(mdir / "methods" / "second_direction_alone", "multi_ablation", 12, without_dim=True)
    write_run(mdir / "controls" / "random_1_all", "random_ablation", 30)
    landing = {"multi_ablation (k=2)": (0.9, "opposite"), "random_ablation (k=2, center=zero)": (0.05, "stays")}
    write_run(mdir / "methods" / "cosmic_ablation", "dim_ablation", 3)
    for folder, lands in (("geometry_methods", landing), ("geometry_cosmic_ablation", {"dim_ablation": (0.7, "between")})):
        (mdir / folder).mkdir()
        (mdir / folder / "geometry.json").write_text(json.dumps({"rows": [
            {"intervention": label, "t": t, "t_lo": t - 0.1, "t_hi": t + 0.1, "label_ci": word} for label, (t, word) in lands.items()]}))
    for i, (name, drop) in enumerate((("none", 0.0), ("dim_ablation", -0.01), ("inlp_flip", 0.0), ("inlp_nullspace", -0.30))):
        write_run(mdir / "capability" / str(i), name, 30, **({"k": 40} if name.startswith("inlp") else {}))
        path = mdir / "capability" / str(i) / "results.json"
        results = json.loads(path.read_text())
        results["metrics"].update({"capability/mmlu/accuracy": 0.4 + drop, "capability/mmlu/n": 228,
                                   "capability/mmlu/accuracy_vs_baseline": drop,
                                   "capability/mmlu/accuracy_vs_baseline_ci95": [drop - 0.05, drop + 0.05],
                                   # general text: cross-entropy in nats per token, rising as much as MMLU falls
                                   "capability/lambada/cross_entropy": 3.0 - drop, "capability/lambada/n": 100,
                                   "capability/lambada/cross_entropy_vs_baseline": -drop,
                                   "capability/lambada/cross_entropy_vs_baseline_ci95": [-drop - 0.01, -drop + 0.02]})
        path.write_text(json.dumps(results))
    for i, (name, quality) in enumerate((("none", 0.05), ("dim_ablation", 0.40), ("inlp_flip", 0.30), ("inlp_nullspace", 0.10))):
        write_run(mdir / "quality" / str(i), name, 30, **({"k": 40} if name.startswith("inlp") else {}))
        path = mdir / "quality" / str(i) / "results.json"
        results = json.loads(path.read_text())
        results["metrics"].update({"harmful/quality": quality, "harmful/quality_ci95": [quality - 0.02, quality + 0.02],
                                   "baseline/harmful/quality": 0.05, "harmful/quality_vs_baseline": quality - 0.05,
                                   "harmful/quality_vs_baseline_ci95": [quality - 0.08, quality - 0.02]})
        path.write_text(json.dumps(results))
    (mdir / "quality" / "report.csv").write_text("")  # the sweep ended
    meta = {"date": "2026-12-02", "hardware": "planted", "data": "planted records", "max_new_tokens": 128, "models": ["qwen05"],
            "matmul": "bfloat16"}
    text = render(tmp_path / "study", tmp_path / "docs", meta).read_text()
    quality = text[text.index("### Answer quality"):]
    assert "| intervention | harmful: refusal | harmful: quality | Δ quality vs unsteered |" in quality
    assert "| none | 75.0% [60–86] | 0.050 [0.030, 0.070] | - |" in quality  # no difference of the baseline from itself
    assert "| dim_ablation | 75.0% [60–86] | 0.400 [0.380, 0.420] | +0.350 [+0.320, +0.380] |" in quality
    assert "`quality`" not in text.split("## Verdict")[0]  # the step ran: not listed as missing
    curve = text[text.index("### Length curve"):]
    assert "| intervention | 32 tokens | 128 tokens (main) | 256 tokens |" in curve
    assert "| dim_ablation | 75% [60–86] | 8% [3–20] | 2% [0–13] |" in curve  # Wilson intervals of 30, 3 and 1 of 40
    assert ("Each budget is judged on its cut of one greedy generation of 256 tokens. At 128 tokens the cut against the main "
            "rows' own 128-token generation, paired (Δ cut − own): none +0.0 [") in curve
    assert "dim_ablation +2.5 [" in curve and "(1 + 0 of 40 prompts judged apart)" in curve
    assert "| **C1** verdict | not applicable | holds | holds |" in curve
    assert (tmp_path / "docs" / "results" / "length_curve.png").stat().st_size > 0
    methods = text[text.index("### Beyond one direction"):]  # multi k=2 refuses the same 2 of 40 as DiM ablation
    assert "(DiM ablation leaves 5% [1–17] refusing, the most a second direction could remove.)" in methods
    assert "multi k=2: Δ +0.0 [-9.2, +9.2] pts → removes less than 10 points more" in methods
    assert "multi k=4: Δ -2.5 [-13.5, +7.3] pts → undecided at this n" in methods  # one discordant prompt of 40
    assert "| projected_ablation | 5% [1–17] | -70.0 [" in methods and "| not run | 1.000 | - | - |" in methods  # multi k=4
    # the second direction alone (12 of 40) against a random direction (30 of 40), both refusing the first prompts
    assert ("the second direction ablated alone (DiM's kept), against a random direction: Δ -45.0 [-58.3, -27.1] pts → "
            "suppresses 27.1–58.3 points more than a random direction: some refusal lives outside DiM's direction.") in methods
    assert "(random_2_all) | 1.000 | 0.90 [0.80, 1.00] opposite | 0.05 [-0.05, 0.15] stays |" in methods  # geometry_methods
    # COSMIC's ablation lands where its own geometry run says (the DiM layer's dim_ablation row is not planted)
    assert "| cosmic_ablation | 8% [" in methods and "| 0.70 [0.60, 0.80] between | - |" in methods
    assert "-70.0 [-81.4, -50.9] (random_1_all) | 1.000 | - | - |" in methods  # projected ablation: no landing measured
    capability = text[text.index("### Capability"):]  # nullspace loses 30 points of MMLU: broken, so C2 is not decided
    assert "**qwen05** (items: mmlu 228, lambada 100)" in capability
    assert "| mmlu (Δ vs unsteered, paired) | lambada nats/token (Δ vs unsteered, paired) |" in capability
    assert "| inlp_nullspace | 10.0% (-30.0 [-35, -25]) | 3.300 (+0.300 [+0.290, +0.320]) |" in capability
    assert "model broken (mmlu Δ acc [-35.0, -25.0] pts below −5)" in text
    numerics = text[text.index("### Numerics"):]  # float32 rows: ablation refuses 4 of 40 where the study's refused 2
    assert "Under float32: C1 holds (study: holds); C2 holds (study: inconclusive)." in numerics  # study: nullspace broken
    assert "| dim_ablation | 5% [1–17] | 10% [4–23] | +5.0 [" in numerics


@pytest.mark.parametrize(("ablation_f32", "passes"), [(2, True), (6, True), (7, False)])
def test_numerics_default_rule_at_the_edge_of_the_interval(tmp_path, ablation_f32, passes):
    """The study's precision stays the default only with the same verdicts and every float32 rate inside its 95%
    interval: DiM ablation refuses 2 of 40 under bfloat16 (Wilson [1.4%, 16.5%]); 6 of 40 (15%) is inside, 7 (17.5%)
    is not, although C1 and C2 are decided the same."""
    mdir = tmp_path / "qwen05"
    (mdir / "train").mkdir(parents=True)
    (mdir / "train" / "fitted.json").write_text(json.dumps({"inlp_rank": 40, "layer": 10, "n_layers": 24, "position": -1}))
    for folder, ablation in ((mdir / "main", 2), (mdir / "numerics", ablation_f32)):
        for i, (name, refused) in enumerate((("none", 30), ("dim_ablation", ablation), ("inlp_flip", 1), ("inlp_nullspace", 25))):
            write_run(folder / str(i), name, refused, **({"k": 40} if name.startswith("inlp") else {}))
    text = "\n".join(numerics_section({"qwen05": ModelRuns(mdir)}, "bfloat16"))
    assert "Under float32: C1 holds (study: holds); C2 holds (study: holds)." in text
    assert f"**bfloat16 products {'pass' if passes else 'fail'} the default rule**" in text
    assert f"{4 if passes else 3} of 4 float32 refusal rates lie inside" in text
    # the paired interval is reported apart from the rule: 4 prompts flipped one way of 40 include 0, 5 do not
    assert ("excludes 0 for dim_ablation" in text) == (ablation_f32 == 7)
    assert "| inlp_flip | 2% [0–13] | 2% [0–13] | +0.0 [" in text and "| 40 → 40 |" in text


PEER_PROMPTS = [f"harmful prompt {i}" for i in range(20)]
PLANTED_META = {"date": "2026-12-02", "hardware": "planted", "data": "planted", "max_new_tokens": 128, "models": ["qwen05"]}


def plant_trial(folder: Path, intervention: str, rate: float, kl: float, asked: list[str] = PEER_PROMPTS,
                params: dict | None = None) -> None:
    """A finished lean run: its refusal rate over ``asked`` (the first prompts refused, so every planted refusal set
    nests in the larger) and its KL."""
    folder.mkdir(parents=True)
    folder.joinpath("results.json").write_text(json.dumps({
        "status": "ok", "model": "qwen05", "intervention": intervention, "params": params or {},
        "metrics": {"harmful/refusal_rate": rate, "harmful/refusal_rate_ci95": [max(0, rate - 0.1), rate + 0.1],
                    "harmless/kl_div": kl}}))
    refused = round(rate * len(asked))
    folder.joinpath("completions.jsonl").write_text("".join(
        json.dumps({"split": "harmful", "prompt": q, "completion": "", "refused": i < refused}) + "\n"
        for i, q in enumerate(asked)))


def plant_search_and_peers(tmp_path: Path) -> Path:
    """Our INLP-flip search (10% at KL 0.05, the baseline) and the peers' read-backs; returns the model's folder."""
    mdir = tmp_path / "study" / "qwen05"
    (mdir / "train").mkdir(parents=True)
    (mdir / "train" / "fitted.json").write_text(json.dumps({"inlp_rank": 16, "layer": 16, "n_layers": 24, "position": -1}))
    plant_trial(mdir / "pareto" / "0", "inlp_flip", 0.10, 0.05)
    plant_trial(mdir / "pareto" / "1", "none", 0.60, 0.0)
    peers = tmp_path / "study" / "peers"  # where run_peer.py puts full-size runs, and the render's default
    plant_trial(peers / "qwen05-heretic" / "report" / "heretic_trial_000", "heretic", 0.05, 0.08)
    plant_trial(peers / "qwen05-heretic" / "report" / "heretic_trial_001", "heretic", 0.20, 0.10)  # dominated by trial 0
    plant_trial(peers / "qwen05-abliterix" / "report" / "abliterix_trial_000", "abliterix", 0.20, 0.10,
                [q + "." for q in PEER_PROMPTS])
    (peers / "qwen05-heretic" / "run.json").write_text(json.dumps({"sizes": {"trials": 12}, "returncode": "timeout"}))
    (peers / "qwen05-abliterix" / "run.json").write_text(json.dumps({"sizes": {"trials": 12}, "returncode": 0}))
    return mdir


def test_the_study_sets_the_peers_fronts_beside_its_search(tmp_path):
    """Planted search trials and planted heretic and abliterix read-backs: one plot with all fronts, each peer's front
    rows in the table (a dominated trial left out), and the dominance statement per peer: heretic's 5% at KL 0.08
    beats our best at that KL (10%), paired over the same 20 prompts; abliterix's front is covered by our trial, and
    its completions of other prompts are not paired."""
    plant_search_and_peers(tmp_path)
    text = render(tmp_path / "study", tmp_path / "docs", PLANTED_META).read_text()
    assert "distances from 1 layer as heretic's; not run yet on qwen05: the study's pareto step runs it)" in text
    assert ("qwen05, heretic: 2 finished trials of 12 planned, its search cut short (timeout; `python "
            "bench/peers/run_peer.py heretic --model qwen05 --resume` continues it) (bench/peers)") in text
    # abliterix exited 0 after 1 of 12 trials (as it does when stopped by Ctrl+C): still cut short, with the resume
    assert ("abliterix: 1 finished trial of 12 planned, its search cut short (stopped early; `python "
            "bench/peers/run_peer.py abliterix --model qwen05 --resume` continues it) (bench/peers)") in text
    assert "![qwen05 fronts](results/qwen05_fronts.png)" in text
    assert "| qwen05 | heretic trial | - | 5.0% | 0.080 | **heretic front** |" in text and "| 20.0% | 0.100 | **heretic" not in text
    assert (tmp_path / "docs" / "results" / "qwen05_fronts.png").stat().st_size > 0
    # heretic: its one front point is not covered by ours (10% > 5% at KL <= 0.08); ours is not covered by it either
    assert "C(ours, heretic) = 0.00, C(heretic, ours) = 0.00; **ours does not dominate heretic's front**: heretic " \
           "refuses less at KL 0.08." in text
    # ours refuses prompts 0-1, heretic prompt 0: +5 points, one discordant pair (McNemar's exact p = 1)
    assert "| heretic_trial_000 | 5.0% | 0.080 | 0 | 10.0% | 0.050 | +5.0 [" in text and "McNemar p 1 (n 20) |" in text
    assert "C(ours, abliterix) = 1.00, C(abliterix, ours) = 0.00; **ours dominates abliterix's front**" in text
    assert "| abliterix_trial_000 | 20.0% | 0.100 | 0 | 10.0% | 0.050 | not paired: our trial's and the peer's " \
           "harmful prompts differ" in text


def test_our_best_front_takes_in_the_heretic_kernel_search(tmp_path):
    """A heretic-kernel trial of ours (pareto_weighted: 5% at KL 0.07) covers heretic's 5% at KL 0.08, which the INLP
    search alone did not: our best front (both searches) now dominates heretic's, the kernel search alone does too, its
    trial is paired from its own folder (it refuses prompt 0 as heretic's does: +0.0), and the table shows what the
    trial searched, not the search's fixed choices."""
    mdir = plant_search_and_peers(tmp_path)
    plant_trial(mdir / "pareto_weighted" / "0_qwen05_weighted_ablation", "weighted_ablation", 0.05, 0.07,
                params={"direction": "per_layer", "direction_index": 0.5, "attn_max_weight": 1.2, "units": "fractions",
                        "projected": True, "embedding": False, "norm_preserving": "rows", "export": False})
    (mdir / "pareto_weighted" / "report.csv").write_text("run\n")  # the sweep finished
    text = render(tmp_path / "study", tmp_path / "docs", PLANTED_META).read_text()
    assert "qwen05: 1 INLP-flip trials, 1 heretic-kernel trials and 1 reference runs, DiM layer 16" in text
    assert "unfinished" not in text
    assert "not run yet" not in text
    assert "C(ours, heretic) = 1.00, C(heretic, ours) = 0.00; **ours dominates heretic's front**" in text
    assert ("**qwen05, our search of heretic's kernel against heretic.** Set coverage (Zitzler & Thiele 1999: the share "
            "of one front that a point of the other weakly dominates): C(our search of heretic's kernel, heretic) = 1.00") in text
    assert "| heretic_trial_000 | 5.0% | 0.080 | 0_qwen05_weighted_ablation | 5.0% | 0.070 | +0.0 [" in text
    assert "| qwen05 | weighted_ablation | direction=per_layer, attn_max_weight=1.2 | 5.0% [0–15] | 0.070 | **front** |" in text
    assert "| 10.0% [0–20] | 0.050 | **front** |" in text  # the INLP trial: lower KL, still on the union's front


def heretic_params(scope: str, index: float, distance: float) -> dict:
    """A heretic 1.4.0 trial's parameters as its read-back records them (positions and distances in layers)."""
    return {"direction_scope": scope, "direction_index": index,
            **{f"{c}.{k}": v for c in ("attn.o_proj", "mlp.down_proj")
               for k, v in (("max_weight", 1.2), ("max_weight_position", 11.5), ("min_weight", 0.4),
                            ("min_weight_distance", distance))}}


def test_heretics_trials_are_set_beside_ours_at_the_same_kernel_parameters(tmp_path):
    """heretic's trial 0 (per layer, distance 2.3 layers) and ours at the same parameters in fractions of the last
    layer (23 on qwen05): paired; its direction index differs, which the per-layer scope does not use. heretic's
    trial 1 (global scope) finds no twin: ours at index 0.5 is 11.5 layers, heretic's 11.6."""
    mdir = plant_search_and_peers(tmp_path)
    report = tmp_path / "study" / "peers" / "qwen05-heretic" / "report"
    for trial, params in (("heretic_trial_000", heretic_params("per layer", 13.0, 2.3)),
                          ("heretic_trial_001", heretic_params("global", 11.6, 2.3))):
        record = json.loads((report / trial / "results.json").read_text())
        (report / trial / "results.json").write_text(json.dumps({**record, "params": params}))
    ours = {"attn_max_weight": 1.2, "attn_max_weight_position": 0.5, "attn_min_weight": 0.4,
            "attn_min_weight_distance": 0.1, "mlp_max_weight": 1.2, "mlp_max_weight_position": 0.5,
            "mlp_min_weight": 0.4, "mlp_min_weight_distance": 0.1, "direction_index": 0.5, "units": "fractions"}
    plant_trial(mdir / "pareto_weighted" / "0_qwen05_weighted_ablation", "weighted_ablation", 0.15, 0.07,
                params={**ours, "direction": "per_layer"})
    plant_trial(mdir / "pareto_weighted" / "1_qwen05_weighted_ablation", "weighted_ablation", 0.05, 0.09,
                params={**ours, "direction": "index"})
    (mdir / "pareto_weighted.command").write_text("python evaluate.py experiment=pareto_weighted_ablation "
                                                  "hydra.sweeper.n_trials=12 model=qwen05\n")  # no report.csv: cut short
    plant_trial(mdir / "pareto_unfiltered" / "0_qwen05_weighted_ablation", "weighted_ablation", 0.05, 0.08,
                params={**ours, "direction": "per_layer"})  # the refusal filter off: heretic's refusal
    (mdir / "filter_direction_cosine.json").write_text(json.dumps(
        {"kept_harmful_train": {"kept": 41, "of": 128}, "cosine_by_layer": [0.99, 0.95, 0.96, 0.90]}))
    text = render(tmp_path / "study", tmp_path / "docs", PLANTED_META).read_text()
    assert ("The refusal filter keeps 41/128 harmful fit prompts; per layer, the cosine between the direction fitted on "
            "those and on all of them (heretic's plain mean difference) is 0.900–0.990, median 0.955") in text
    assert ("2 heretic-kernel trials (unfinished: 2 of 12 trials; `python bench/study.py --models qwen05 --steps "
            "pareto` goes on from them) and 1 reference runs") in text
    assert "**qwen05: our heretic-kernel search is unfinished: 2 of 12 trials;" in text
    assert "**qwen05, heretic's trials and ours at the same kernel parameters** (1 of 2 heretic trials" in text
    # ours refuses prompts 0-2, heretic's prompt 0: +10 points, two discordant pairs
    assert "| heretic_trial_000 | 0_qwen05_weighted_ablation | 5.0% | 15.0% | +10.0 [" in text
    assert "| 0.080 | 0.070 |" in text and "| heretic_trial_001 | 1_qwen05" not in text
    unfiltered = text.split("heretic's trials and ours with the refusal filter off (`--steps unfiltered`: every fit prompt, "
                            "as heretic's direction)")[1]
    assert unfiltered.startswith(" at the same kernel parameters** (1 of 2 heretic trials") and "filter keeps" not in unfiltered.split("|")[0]
    assert "| heretic_trial_000 | 0_qwen05_weighted_ablation | 5.0% | 5.0% | +0.0 [" in unfiltered
    assert "Ours refuses less, paired interval below zero, in 0 of 1 (more in 0), mean Δ +10.0 pts; its KL is lower " \
           "in 1 of 1. The refusal filter keeps" in text


def test_the_study_renders_the_judges_accuracy_from_validate_json(tmp_path):
    """--validate --calibrate's JSON on the labelled fixture becomes the judges' table (threshold from dev)."""
    from refusal.__main__ import main

    fixture = Path(__file__).parent / "fixtures" / "judge_labels_example.jsonl"
    out = tmp_path / "judges_gold.json"
    assert main(["judges", "--validate", str(fixture), "--calibrate", "--judges", "substring,heretic", "--json", str(out),
                 f"cache_dir={tmp_path}"]) == 0
    text = "\n".join(judges_section(out))
    assert "on its `test, thresholds from dev` rows: n = 10" in text
    assert text.count("| 0.5 |") == 2  # 0/1 scores: both thresholds at the midpoint
    assert judges_section(tmp_path / "absent.json") == []


def test_the_primary_judge_changes_only_when_another_clears_its_kappa_interval():
    def kappa(value: float, low: float, high: float) -> dict:
        return {"kappa": {"value": value, "low": low, "high": high}}

    tied = primary_note({"model": kappa(0.80, 0.65, 0.94), "substring": kappa(0.80, 0.65, 0.94)})
    assert "no judge beats it" in tied and "highest κ: `substring`" in tied
    assert "no judge beats it" in primary_note({"model": kappa(0.9, 0.8, 1.0), "substring": kappa(0.7, 0.5, 0.8)})  # touching
    assert "model beats it beyond its interval" in primary_note({"model": kappa(0.9, 0.81, 1.0),
                                                                         "substring": kappa(0.7, 0.5, 0.8)})


def test_the_tunability_plot_draws_inlp_curves_beside_dim_points(tmp_path):
    rows = [{key: v for key, v in {"model": "m", "intervention": name, "params": "-", "params/k": k, "params/alpha": a,
                                   "params/coeff": c, "harmless/perplexity": ppl, "harmful/refusal_rate": rate}.items()
             if v is not None}
            for name, k, a, c, ppl, rate in [
                ("none", None, None, None, 5.0, 0.9), ("dim_ablation", None, None, None, 5.5, 0.1),
                ("actadd", None, None, -1.0, 6.0, 0.2), ("inlp_nullspace", 1, None, None, 5.1, 0.8),
                ("inlp_nullspace", 4, None, None, 5.3, 0.5), ("inlp_flip", 1, 1.0, None, 5.2, 0.7),
                ("inlp_flip", 4, 1.0, None, 5.8, 0.3), ("inlp_flip", 4, 0.5, None, 5.4, 0.6)]]
    path = plot_tunability(rows, tmp_path / "tune.png")
    assert path.stat().st_size > 20_000


def planned_commands(root, steps: list[str], common: list[str] | None = None, pareto_trials: int = 0,
                     methods: list[str] | None = None) -> list[list[str]]:
    """The commands the study would run for qwen05's ``steps`` (recorded, not run; each leaves its done marker)."""
    calls = []

    class Recorded(Study):
        def run(self, argv, log, done):
            calls.append(argv)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.touch()
            return True

    (root / "qwen05" / "train").mkdir(parents=True)
    (root / "qwen05" / "train" / "fitted.json").write_text(json.dumps({"inlp_rank": 16, "n_layers": 24}))
    opts = argparse.Namespace(ks=[], alphas=[], controls=[], token_models=["qwen05"], token_budgets=[32, 64, 128, 256, 512],
                              matmul="bfloat16", heldout_n=24, pareto_trials=pareto_trials, k_interventions=["inlp_flip"],
                              methods=list(METHODS) if methods is None else methods)
    Recorded(root, common or ["eval.max_new_tokens=128"], root.parent).model("qwen05", steps, opts)
    return calls[1:]  # after the train step


def test_the_methods_step_measures_where_every_method_and_random_control_lands(tmp_path):
    calls = planned_commands(tmp_path / "study", ["methods"])
    geometry = calls[-2]
    assert geometry[:3] == ["-m", "refusal.geometry", "--interventions"]
    specs = geometry[3].split(",")
    assert specs[:2] == ["none", "dim_ablation"] and "multi_ablation:k=4" in specs and "rdo_ablation:k=3" in specs
    assert "projected_ablation:norm_preserving=true" in specs and "random_ablation:k=1:center=zero" in specs
    assert "weighted_ablation:direction=per_layer:projected=true:embedding=false" in specs
    # COSMIC picks another layer: not among the DiM layer's specs (its label would be dim_ablation's), but a geometry
    # run of its own at COSMIC's pick, after every method run and the shared geometry
    assert len(specs) == 2 + len(METHODS) - 1 + 1 and len(calls) == len(METHODS) + 2
    own = calls[-1]
    assert own[:4] == ["-m", "refusal.geometry", "--interventions", "none,dim_ablation"] and own[-1] == "layer=cosmic"
    assert own[own.index("--out") + 1].endswith("geometry_cosmic_ablation")


def test_methods_run_in_the_order_asked_and_their_geometry_waits_for_all_of_them(tmp_path):
    """--methods picks the runs of a session (RDO's cone alone takes hours on qwen15); the geometry reads every
    method's fit, so it runs in the invocation that finds all method runs done, never on a subset."""
    root = tmp_path / "study"
    first = planned_commands(root, ["methods"], methods=["rdo_cone_3", "projected_ablation"])
    assert [c[-1] for c in first] == [f"hydra.run.dir={root / 'qwen05' / 'methods' / name}"
                                      for name in ("rdo_cone_3", "projected_ablation")]  # no geometry yet
    shutil.rmtree(root / "qwen05" / "train")
    rest = [name for name in METHODS if name not in ("rdo_cone_3", "projected_ablation")]
    second = planned_commands(root, ["methods"], methods=rest)
    assert len(second) == len(rest) + 2 and second[-2][:2] == ["-m", "refusal.geometry"]


def test_the_plan_lists_each_runs_state_runs_nothing_and_times_the_rest_by_the_record(tmp_path):
    """--plan: done (output made by this command), changed (made by another: the runner would refuse it), started (a
    stamp without output: it resumes), to do; a run without its own time takes another model's, scaled by the median
    ratio of the runs both made (here 2.0 and 4.0 -> 3.0)."""
    root = tmp_path / "study"
    opts = argparse.Namespace(ks=[], methods=["projected_ablation", "multi_ablation_2", "rdo_direction", "random_2_all",
                                              "rdo_cone_3"])
    shown = {}

    class Shown(Study):  # the commands as the runner would stamp them
        def run(self, argv, log, done):
            shown[log.stem] = self.portable(argv)
            return True

    (root / "qwen15" / "train").mkdir(parents=True)
    (root / "qwen15" / "train" / "fitted.json").write_text(json.dumps({"inlp_rank": 16}))
    Shown(root, [], tmp_path).model("qwen15", ["methods"], opts)
    methods = root / "qwen15" / "methods"
    for name, made_by in [("projected_ablation", None), ("multi_ablation_2", "python other"), ("rdo_direction", None)]:
        (methods / name).mkdir(parents=True)
        (methods / name / "results.json").write_text("{}")
        (methods / f"{name}.command").write_text((made_by or shown[name]) + "\n")
    shutil.rmtree(methods / "rdo_direction")  # its stamp stays: started, stopped before its output
    (root / "qwen15" / "train.command").write_text(shown["train"] + "\n")
    minutes = {"train.log": 2.0, "main.log": 40.0, "methods/random_2_all.log": 5.0}
    (root / "qwen05").mkdir()
    (root / "qwen05" / "timings.json").write_text(json.dumps({k: {"wall_s": 60 * v} for k, v in minutes.items()}))
    (root / "qwen15" / "timings.json").write_text(json.dumps({"train.log": 240.0, "main.log": {"wall_s": 60 * 160.0}}))

    plan = Study(root, [], tmp_path, plan_only=True)
    plan.model("qwen15", ["methods"], opts)
    states = {run.step: run.state for run in plan.planned}
    assert states == {"train.log": "done", "methods/projected_ablation.log": "done", "methods/multi_ablation_2.log": "changed",
                      "methods/rdo_direction.log": "started", "methods/random_2_all.log": "to do",
                      "methods/rdo_cone_3.log": "to do"}
    assert not list(root.rglob("*.log")) and not (methods / "random_2_all.command").exists()  # nothing ran
    times = {"qwen05": minutes, "qwen15": {"train.log": 4.0, "main.log": 160.0}}
    assert estimate("qwen15", "methods/random_2_all.log", times) == (15.0, "qwen05's × 3.00, the median ratio over 2 runs both made")
    assert estimate("qwen15", "main.log", times) == (160.0, "its own last run")
    assert estimate("qwen15", "methods/rdo_cone_3.log", times) is None
    table = render_plan(plan.planned, root)
    assert "| qwen15 | methods/random_2_all | to do | 15.0 | qwen05's × 3.00" in table
    assert "qwen15: 4 runs left, about 15 min on this record (3 with no time yet)" in table


def test_the_length_curve_judges_every_budget_on_cuts_of_one_generation_at_the_longest(tmp_path):
    """The tokens step: one sweep per budget (the main budget included, to check the cut against the main rows), all
    with eval.generate_new_tokens at the longest budget, so the whole curve costs one generation per row."""
    root = tmp_path / "study"
    sweeps = [argv for argv in planned_commands(root, ["tokens"]) if argv[:2] == ["evaluate.py", "-m"]]
    budgets = [next(a for a in argv if a.startswith("eval.max_new_tokens=")) for argv in sweeps]
    assert budgets == [f"eval.max_new_tokens={b}" for b in (32, 64, 128, 256, 512)]
    assert all("eval.generate_new_tokens=512" in argv and sum(a.startswith("eval.max_new_tokens=") for a in argv) == 1
               for argv in sweeps)  # the study's own budget (128) gives way to each sweep's
    assert [argv[-1] for argv in sweeps] == [f"hydra.sweep.dir={root / 'qwen05' / 'tokens' / str(b)}" for b in (32, 64, 128, 256, 512)]


@pytest.mark.parametrize(("refused", "quality", "verdict"), [
    ((0.55, 0.70), (0.51, 0.90), "passes"),
    ((0.50, 0.70), (0.60, 0.90), "undecided"),  # an interval touching chance does not pass
    ((0.30, 0.51), (0.60, 0.90), "undecided"),
    ((0.02, 0.50), (0.60, 0.90), "fails"),      # at or below chance: fails
    ((0.60, 0.90), (0.10, 0.45), "fails"),
])
def test_the_quality_judge_passes_its_check_only_above_chance_on_both_rankings(refused, quality, verdict):
    from studykit.sections import quality_check_verdict

    assert quality_check_verdict({"low": refused[0], "high": refused[1]}, {"low": quality[0], "high": quality[1]}) == verdict


def test_the_quality_check_reads_the_committed_check_and_says_when_its_settings_differ(tmp_path):
    """The committed ``judges --validate --quality`` output, judged by the rule; a check made with other judge
    settings than the study's is flagged."""
    from studykit.plan import QUALITY_JUDGE
    from studykit.sections import quality_gold_check

    path = tmp_path / "quality_gold.json"
    assert quality_gold_check(path, QUALITY_JUDGE)[0].startswith("Not checked yet: no quality_gold.json")
    check = {"n": 153, "split": "test", "command": "python -m refusal judges --validate --quality --split test",
             "judge": {**QUALITY_JUDGE, "refused_by": "substring"},
             "refused_auc": {"value": 0.9, "low": 0.85, "high": 0.95, "positive": 31, "negative": 122},
             "quality_auc": {"value": 0.7, "low": 0.55, "high": 0.8, "positive": 90, "negative": 63},
             "rubric_refused_auc": {"value": 0.4, "low": 0.3, "high": 0.5, "positive": 31, "negative": 122}}
    path.write_text(json.dumps(check))
    text = quality_gold_check(path, QUALITY_JUDGE)[0]
    assert "item 1 (the substring judge's label)" in text and "AUC 0.90 [0.85, 0.95] (31 vs 122)" in text
    assert "The judge **passes** the check" in text and "own item-1 digit would rank them with AUC 0.40" in text
    assert "other judge settings" not in text
    path.write_text(json.dumps({**check, "quality_auc": {**check["quality_auc"], "low": 0.2, "high": 0.5}}))
    assert "The judge **fails** the check" in quality_gold_check(path, QUALITY_JUDGE)[0]
    text = quality_gold_check(path, {**QUALITY_JUDGE, "reasoning_tokens": 0})[0]
    assert "other judge settings than this quality step** (reasoning_tokens)" in text


@pytest.mark.parametrize(("ablation_ppl", "broken"), [(6.0, False), (6.02, True)])  # 3x the unsteered 2.0 is the line
def test_a_negative_control_model_gets_its_rows_and_costs_with_broken_runs_named_and_no_verdict(tmp_path, ablation_ppl, broken):
    mdir = tmp_path / "study" / "gemma3_270m"
    (mdir / "train").mkdir(parents=True)
    (mdir / "train" / "fitted.json").write_text(json.dumps({
        "inlp_rank": 31, "layer": 3, "n_layers": 18, "position": -1,
        "refusal_filter": {"harmful_train": {"kept": 0, "of": 128, "used_whole": True}}}))
    write_run(mdir / "main" / "0", "none", 0, base=0)
    write_run(mdir / "main" / "1", "dim_ablation", 0, ppl=ablation_ppl, base=0)
    write_run(mdir / "main" / "2", "inlp_flip", 0, ppl=2.2, base=0, k=31)
    meta = {"date": "2026-12-03", "hardware": "planted", "data": "planted records", "max_new_tokens": 24,
            "models": ["gemma3_270m"]}
    text = render(tmp_path / "study", tmp_path / "docs", meta).read_text()
    section = text[text.index("### Negative controls"):].split("\n### ")[0]
    ablation = next(line for line in section.splitlines() if line.startswith("| gemma3_270m | dim_ablation |"))
    assert f"×{ablation_ppl / 2.0:.3g}" in ablation and ablation.endswith("| broken |") == broken
    assert "| gemma3_270m | inlp_flip | 0.0% [0–9] |" in section and "×1.1" in section
    assert "kept 0 of 128 harmful train prompts (none: all were used); DiM layer 3, INLP rank 31" in section
    assert "### Converged INLP" not in text  # no premise, no verdict


@pytest.mark.parametrize(("lo", "hi", "says"), [
    (-0.041, -0.003, "suppresses more than DiM ablation alone, by at most 4.1 points"),  # wholly below 0 wins
    (-0.041, 0.0, "removes less than 10 points more"),  # touching 0 is not "more"
    (-0.0999, 0.05, "removes less than 10 points more"),
    (-0.10, 0.05, "undecided at this n"),  # the margin itself is not "less than"
    (-0.25, -0.12, "suppresses more than DiM ablation alone, by at most 25.0 points"),
])
def test_what_more_directions_add_at_the_rule_boundaries(lo, hi, says):
    assert more_directions_add(PairedDifference((lo + hi) / 2, lo, hi, 311)) == says


@pytest.mark.parametrize(("lo", "hi", "says"), [
    (-0.041, -0.003, "suppresses 0.3–4.1 points more than a random direction: some refusal lives outside DiM's direction"),
    (-0.041, 0.0, "suppresses less than 10 points more than a random direction"),  # touching 0 is not "more"
    (-0.0999, 0.05, "suppresses less than 10 points more than a random direction"),
    (-0.10, 0.05, "undecided at this n"),  # the margin itself is not "less than"
    (-0.25, 0.0, "undecided at this n"),
])
def test_what_the_second_direction_alone_says_at_the_rule_boundaries(lo, hi, says):
    assert second_direction_alone_says(PairedDifference((lo + hi) / 2, lo, hi, 311)) == says


def test_the_pareto_steps_commands_compose_with_the_studys_own_overrides(tmp_path):
    """The study's common overrides name test sets (StrongREJECT, over-refusal) that a lean trial (eval=trial,
    test_sets: null) has no place for: Hydra composes the reference sweep and the search only without them. Composed
    here by Hydra itself (qwen05's first pareto run failed on exactly this before any trial)."""
    from refusal.app.startup import _compose

    common = ["data=embedded", "logger=none", "eval.max_new_tokens=128", "model.matmul=bfloat16",
              "+eval.test_sets.strongreject={source: pypi, benchmark: strongreject, n: null}", "eval.test_sets.overrefusal.n=100",
              "data.n_test=100"]
    calls = planned_commands(tmp_path / "study", ["pareto"], common, pareto_trials=12)
    assert len(calls) == 3 and not any("test_sets" in a for argv in calls for a in argv)
    heretic = calls[2]  # heretic's kernel in our search: heretic's distance range from 1 layer (1/23 of qwen05's last)
    assert "experiment=pareto_weighted_ablation" in heretic and "hydra.sweeper.n_trials=12" in heretic
    assert {"intervention.attn_min_weight_distance=interval(0.0434783,0.6)",
            "intervention.mlp_min_weight_distance=interval(0.0434783,0.6)"} <= set(heretic)
    assert heretic[-1].endswith("qwen05/pareto_weighted")
    for argv in calls:
        overrides = [a for a in argv[1:] if a != "-m" and not a.startswith("hydra.sweep")]
        cfg, error = _compose(REPO / "conf", "config", [*overrides, "model=tiny"], multirun=True)
        assert error is None and cfg.eval.test_sets is None and cfg.data.n_test == 100 and cfg.eval.max_new_tokens == 128


def test_both_fronts_by_the_peers_own_count(tmp_path):
    """peer_count.json (the peer's rule on every trial) re-decides dominance: our trial 0 refuses 10 of 20 by the peer's
    count at KL 0.05; the peer's trial refuses 8 at KL 0.08 (not covered: ours is the lowest at KL <= 0.08), then 10 (a
    tie at KL 0.08 is covered: weakly dominated); a trial of ours the count file does not name is left out."""
    from studykit.peers import by_peer_count

    def row(run: str, kl: float) -> dict:
        return {"run": run, "harmful/refusal_rate": 0.05, "harmless/kl_div": kl}

    ours = [row("0_flip", 0.05), row("1_none", 0.0), row("2_unjudged", 0.01)]
    theirs = [row("abliterix_trial_000", 0.08)]

    def lines(peer_refusals: int) -> str:
        (tmp_path / "peer_count.json").write_text(json.dumps({
            "ours": {"0_flip": {"refusals": 10, "n": 20}, "1_none": {"refusals": 16, "n": 20}},
            "peer": {"abliterix_trial_000": {"refusals": peer_refusals, "n": 20}, "unsteered": {"refusals": 15, "n": 20}}}))
        return "\n".join(by_peer_count("qwen05", ours, "abliterix", theirs, tmp_path))

    text = lines(8)
    assert "unsteered 15/20): C(ours, abliterix) = 0.00, C(abliterix, ours) = 0.00; by its count ours does not " \
           "dominate abliterix's front (abliterix refuses less at KL 0.08)" in text
    assert "| ours | 0_flip | 50.0% | 5.0% | 0.050 |" in text and "| abliterix | abliterix_trial_000 | 40.0% | 5.0% | 0.080 |" in text
    assert "2_unjudged" not in text
    assert "C(ours, abliterix) = 1.00, C(abliterix, ours) = 0.00; by its count too, ours dominates" in lines(10)
    assert by_peer_count("qwen05", ours, "heretic", theirs, tmp_path / "absent") == []


def test_the_header_names_every_machine_the_steps_ran_on():
    """meta.json from before the list (one string), one machine, and two: a row measured on the first machine must
    not be credited to the one that ran the last step."""
    assert machines({"hardware": "2 × Intel"}) == machines({"hardware": ["2 × Intel"]}) == "2 × Intel"
    both = machines({"hardware": ["2 × Intel", "2 × AMD EPYC"]})
    assert "2 × Intel" in both and "2 × AMD EPYC" in both and "results.json" in both
