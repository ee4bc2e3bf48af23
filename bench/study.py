"""The study behind docs/RESULTS.md: fits, sweeps, controls and geometry per model, then the verdict.

    python bench/study.py                                  # qwen05 and qwen15, every step
    python bench/study.py --models qwen05 --steps main k geometry
    python bench/study.py --models qwen15 --ks 4 16 --alphas 2.0 --controls dim_ablation_selected flip_all
    python bench/study.py --render-only                    # re-render docs/RESULTS.md from study/
    python bench/study.py --models qwen15 --plan           # what is done, started, left, and its time by the record

Each step is an ordinary command (printed, and listed in the report): ``train.py`` once per model, then
``evaluate.py`` sweeps and control runs into ``study/<model>/<step>/`` and ``python -m refusal.geometry``; the
``pareto`` step is an Optuna search (``experiment=pareto_inlp_flip``, lean trials, ``--pareto-trials``) with the
baseline, DiM ablation and actadd as reference points in its folder, and heretic's kernel in the same search
(``experiment=pareto_weighted_ablation``); the ``unfiltered`` step reruns that search's random start-up trials (the
parameters heretic's own run drew) with Arditi's refusal filter off, to tell the filter's part in how ours and
heretic's differ at the same parameters. A step whose output already exists is skipped, so an interrupted study
resumes where it stopped. INLP runs to convergence (the study's setting); the k sweep includes k=16, the setting of
earlier versions, and the verdict is given under both. The verdict (``studykit.verdict``) pairs the runs prompt by
prompt, from each run's completions.jsonl; C3 needs at least 6 values of k, full rank included (``KS``). Nothing
here runs in CI. Wall and CPU time per step are written into the report (``<model>/timings.json``); a step stopped
part way is marked so, and its resume appends to its log and adds its time to the stopped segments'. At the study's
settings (128 new tokens; 100 + 311 harmful, 100 harmless and 100 over-refusal test prompts; bfloat16 products) a
run is ~8 min on qwen05 on an idle 2-core CPU and 11–20 min on qwen15 (its main step: 80 min), so the study spans
sessions. ``study/`` is committed with its fits (``study/artifacts``; per-job plots left out, see .gitignore);
stamps name the study and splits folders as ``$STUDY`` and ``$SPLITS``, and sweeps run with ``resume=true``, so a
fresh checkout resumes where the last one stopped, job by job.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: studykit and _common

from studykit.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
