"""``python bench/study.py``'s arguments: which models and steps, the study's settings, render only."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from _common import host_info

from refusal.app.signals import stop_on_signals
from refusal.artifacts import atomic_write_text
from refusal.models.numerics import FAST_RATIO, bf16_speedup
from refusal.run_files import archive_completions

from .plan import ALPHAS, CONTROL_MODELS, CONTROLS, KS, METHODS, REPO, SPLITS_DIR, STEPS, STUDY_MODELS
from .progress import render_plan
from .render import machine_list, render
from .run import Study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The study behind docs/RESULTS.md: fits, sweeps, controls and geometry "
                                                 "per model, then the verdict (bench/study.py).")
    parser.add_argument("--models", nargs="+", default=STUDY_MODELS + CONTROL_MODELS,
                        help=f"the negative controls ({', '.join(CONTROL_MODELS)}) run the main step only")
    parser.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    parser.add_argument("--ks", nargs="+", type=int, default=KS, help="k sweep (below the converged rank)")
    parser.add_argument("--alphas", nargs="*", type=float, default=ALPHAS, help="flip α sweep at the converged rank")
    parser.add_argument("--controls", nargs="*", default=list(CONTROLS), choices=list(CONTROLS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                        help="the methods step's runs, in this order (their geometry runs once all of them are done)")
    parser.add_argument("--token-models", nargs="*", default=["qwen05"],
                        help="models whose main rows rerun at --token-budgets and (numerics step) in float32")
    parser.add_argument("--token-budgets", nargs="*", type=int, default=[32, 64, 128, 256, 512],
                        help="the length curve: the main rows judged at each budget, on cuts of one generation at the "
                             "largest (so the main budget's point, cut, is checked against the main rows' own generation)")
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
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--render-only", action="store_true")
    only.add_argument("--plan", action="store_true",
                        help="list the asked steps' runs as done / started / to do with the time left by the study's own "
                             "record; run nothing")
    args = parser.parse_args(argv)

    data = ["data=refusal_direction", f"data.dir={args.splits.resolve()}"] if args.splits.is_dir() else ["data=embedded"]
    common = [*data, "logger=none", "progress=false", "resume=true", f"eval.max_new_tokens={args.max_new_tokens}",
              f"model.matmul={args.matmul}", f"+eval.test_sets.{args.heldout}={{source: pypi, benchmark: {args.heldout}, n: null}}",
              f"eval.test_sets.overrefusal.n={args.overrefusal_n}"]
    if args.n_test:
        common.append(f"data.n_test={args.n_test}")
    common += args.override
    meta_path = args.root / "meta.json"
    if args.matmul == "bfloat16" and not args.render_only and (ratio := bf16_speedup("cpu")) < FAST_RATIO:
        print(f"note: this CPU computes a bfloat16 product at {ratio:.2f}x the speed of a float32 one (no bfloat16 "
              "matrix units), so --matmul bfloat16 runs the same rounding on float32 kernels (models.numerics) at "
              "float32's speed: --plan's times (the study's own record, taken on a CPU with AMX) can be several times "
              "short", flush=True)
    if args.plan:
        study = Study(args.root, common, args.splits, plan_only=True)
        for model in args.models:
            study.model(model, [s for s in args.steps if model not in CONTROL_MODELS or s == "main"], args)
        print(render_plan(study.planned, args.root))
        return 0
    if args.render_only:
        if not meta_path.exists():
            parser.error(f"--render-only: no {meta_path}; run the study first")
        meta = json.loads(meta_path.read_text())
        if archived := archive_completions(args.root):  # runs copied in from a worktree, as the runner leaves them
            print(f"archived {archived} completions.jsonl as .gz under {args.root}")
    else:
        stop_on_signals()
        study = Study(args.root, common, args.splits)
        for model in args.models:
            study.model(model, [s for s in args.steps if model not in CONTROL_MODELS or s == "main"], args)
        info = host_info("cpu")
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
            "hardware": [f"{info.get('cpu_count')} × {info.get('cpu')}, torch {info.get('torch')}, no GPU"],
            "data": ("the Arditi et al. `refusal_direction` splits (AdvBench-derived harmful, Alpaca harmless), "
                     f"{args.n_test or 'all configured'} test prompts per class"
                     if args.splits.is_dir() else "the embedded set (../shared splits not found)"),
            "max_new_tokens": args.max_new_tokens, "token_budgets": args.token_budgets, "models": args.models,
            "verdict_column": args.heldout, "matmul": args.matmul,
        }
        if meta_path.exists():  # an earlier invocation ran other models or steps: keep them in the report
            old = json.loads(meta_path.read_text())
            meta["models"] = [*old["models"], *(m for m in args.models if m not in old["models"])]
            machines = machine_list(old)
            meta["hardware"] = [*machines, *(h for h in meta["hardware"] if h not in machines)]
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {render(args.root, args.docs, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
