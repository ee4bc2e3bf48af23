"""The bench scripts in smoke mode (tiny model): they run, write their CSV rows where told, and render.

The figures of a smoke run are not judged (the tiny model on a shared CPU); this guards the
plumbing that docs/BENCHMARKS.md depends on, so a broken bench shows up in CI rather than in the
hour-long real run.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHES = ["extraction", "hooks", "selection", "inlp", "evaluate", "trial"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_all_smoke_writes_only_where_told_and_renders(tmp_path):
    results, page = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    repo_csvs = {p: p.read_bytes() for p in (REPO / "bench" / "results").glob("*.csv")}
    env = {**os.environ, "REFUSAL_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "bench/run_all.py", "--smoke", "--results-dir", str(results), "--docs-out", str(page)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in BENCHES:
        rows = _rows(results / f"{name}.csv")
        assert len(rows) == 1, name
        assert rows[0].get("smoke", "1") == "1" and rows[0].get("model", "tiny") == "tiny", name  # inlp.csv: no model
    assert {p: p.read_bytes() for p in (REPO / "bench" / "results").glob("*.csv")} == repo_csvs, "smoke rows leaked"

    selection = _rows(results / "selection.csv")[0]
    full, shortlist, last = (int(selection[f"{m}_shared_candidates"]) for m in ("full", "shortlist", "last"))
    assert full > shortlist > last > 0  # the shortlist scores a subset of full and a superset of last
    for mode in ("full", "shortlist", "last"):  # both scorers ran in the same process and agreed on the winner
        assert selection[f"{mode}_plain_candidates"] == selection[f"{mode}_shared_candidates"]
        assert selection[f"{mode}_same_pick"] == "True" and float(selection[f"{mode}_shared_over_plain"]) > 0
    hooks = _rows(results / "hooks.csv")[0]
    for name in ("actadd", "dim_ablation", "inlp_nullspace", "inlp_flip", "random_ablation", "orthogonalized"):
        assert float(hooks[f"{name}_ratio"]) > 0, name  # every registered intervention, the plugin included
        if name != "orthogonalized":  # hooked: the attributed figure adds the hooks' own (positive) work per step
            assert float(hooks[f"{name}_hook_ms_per_step"]) > 0 and float(hooks[f"{name}_attributed_ratio"]) > 1, name
    evaluate = _rows(results / "evaluate.csv")[0]
    assert evaluate["warm_rc"] == "0" and float(evaluate["warm_s"]) > 0 and float(evaluate["warm_rss_mb"]) > 0
    trial = _rows(results / "trial.csv")[0]  # timed lean trials after an untimed setup trial
    assert trial["intervention"] == "inlp_flip" and trial["varied"] == "alpha" and int(trial["repeats"]) == 5
    assert 0 < float(trial["trial_min_s"]) <= float(trial["trial_s"]) and float(trial["generate_s"]) > 0
    assert float(trial["setup_s"]) > float(trial["trial_min_s"])  # the setup trial also loaded and fitted

    text = page.read_text()
    for title in ("Activation extraction", "Hook overhead", "DiM direction selection", "INLP fitting", "evaluate.py",
                  "Lean search trial"):
        assert title in text, title
    assert "not judged (smoke)" in text and "shared-prefix ÷ plain" in text


def test_bench_timeout_counts_running_time_only(tmp_path, monkeypatch):
    """A bench run paused with SIGSTOP (to free the CPU for something else) is neither timed nor killed for the pause."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import bench_evaluate

    started: list[int] = []
    popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        proc = popen(*args, **kwargs)
        started.append(proc.pid)
        return proc

    def pause_then_resume() -> None:
        while not started:
            time.sleep(0.01)
        os.killpg(started[0], signal.SIGSTOP)
        time.sleep(3.0)
        os.killpg(started[0], signal.SIGCONT)

    monkeypatch.setattr(bench_evaluate.subprocess, "Popen", recording_popen)
    pauser = threading.Thread(target=pause_then_resume)
    pauser.start()
    # busy for 0.5 s of CPU time (a sleep's deadline would pass while stopped)
    busy = [sys.executable, "-c", "import time\nwhile time.process_time() < 0.5: pass"]
    out = bench_evaluate.run_child(busy, dict(os.environ), tmp_path / "log", timeout=2.5)
    pauser.join()
    assert out["rc"] == 0 and not out["timed_out"]  # > 3.5 s of wall time, ~0.5 s of it running
    assert 0.45 < out["s"] < 2.5

    sleeper = [sys.executable, "-c", "import time; time.sleep(5)"]
    killed = bench_evaluate.run_child(sleeper, dict(os.environ), tmp_path / "log2", timeout=0.5)
    assert killed["timed_out"] and killed["rc"] != 0


def test_a_trial_timed_beside_a_peer_is_judged_by_the_ratio_from_the_same_run(monkeypatch):
    """bench_trial --peer: the row's target becomes ours ÷ peer ≤ 1 (both timed in one run); without it, the fixed
    32 s (heretic's time once measured at 32 + 32 prompts and 32 tokens) and only on that work."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import run_all

    same_run = {f.key: f for f in run_all._trial({"prompts": "32", "tokens": "32", "peer": "heretic"})}
    assert same_run["ratio_vs_peer"].target == 1.0 and same_run["trial_s"].target is None
    assert "heretic" in same_run["peer_trial_s"].label
    alone = {f.key: f for f in run_all._trial({"prompts": "32", "tokens": "32"})}
    assert "ratio_vs_peer" not in alone and alone["trial_s"].target == 32.0
    assert {f.key: f for f in run_all._trial({"prompts": "8", "tokens": "32"})}["trial_s"].target is None


def test_the_docs_page_keeps_a_gpu_row_beside_the_cpu_row_of_the_same_model(tmp_path, monkeypatch):
    """The page shows the latest row per bench and model; a GPU's row must not replace the CPU's (their targets
    and figures differ), and a later CPU row replaces only the earlier CPU row."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import run_all

    csv_path = tmp_path / "hooks.csv"
    csv_path.write_text("model,device,gpu,value\n"
                        "smollm2,cpu,,1\n"
                        "smollm2,cuda:0,NVIDIA H100 80GB HBM3,2\n"
                        "smollm2,cpu,,3\n"
                        "qwen05,cpu,,4\n")
    latest = run_all.latest_rows(csv_path, run_all.section_for("hooks"))
    assert {key: row["value"] for key, row in latest.items()} == {
        "smollm2": "3", "smollm2 on NVIDIA H100 80GB HBM3": "2", "qwen05": "4"}


def test_the_trial_section_keeps_one_row_per_peer_timed_beside_it(tmp_path, monkeypatch):
    """A run timed beside abliterix must not hide the one timed beside heretic (each ratio is its own run's)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import run_all

    csv_path = tmp_path / "trial.csv"
    csv_path.write_text("model,device,gpu,peer,trial_s\nqwen05,cpu,,heretic,1\nqwen05,cpu,,,2\n"
                        "qwen05,cpu,,abliterix,3\nqwen05,cpu,,heretic,4\n")
    latest = run_all.latest_rows(csv_path, run_all.section_for("trial"))
    assert {key: row["trial_s"] for key, row in latest.items()} == {
        "qwen05 (vs heretic)": "4", "qwen05": "2", "qwen05 (vs abliterix)": "3"}


def test_decoding_profile_names_the_operators_of_each_dtype(tmp_path):
    """bench/profile_generation.py (what found cuDNN attention's per-step cost on a GPU) runs and prints one
    operator table per dtype, the model's products among them."""
    env = {**os.environ, "REFUSAL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "bench/profile_generation.py", "--model", "tiny", "--rows", "4", "--tokens", "4",
                           "--top", "5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## tiny float32 on cpu: 4 rows x 4 tokens" in proc.stdout and "## tiny bfloat16 on cpu" in proc.stdout
    assert proc.stdout.count("Self CPU time total") == 2 and "aten::mm" in proc.stdout
