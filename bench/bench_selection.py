"""Wall time of DiM direction selection: every position vs. the last-position shortlist.

Selection scores each candidate direction (one per eligible layer and post-instruction position)
on the val split: bypass and KL under directional ablation, induce under activation addition.
``full`` scores all positions (fit.dim.positions=all, Arditi et al.); ``last`` only the last one
(fit.dim.positions=last). Activations come from the pipeline's on-disk cache (computed once if
missing, timed separately), so the figures are selection alone: CandidateScorer (which computes the
unsteered val logits) plus select_direction, exactly as pipeline.fit_dim runs them.

    python bench/bench_selection.py --model qwen05
    python bench/bench_selection.py --smoke
"""

from __future__ import annotations

import time
import warnings

import _common as C

from refusal.activations import ActivationCache
from refusal.fitting.dim import CandidateScorer, SelectionConfig, dim_candidates, select_direction

NAME = "selection"


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(repeats=1)
    parser.add_argument("--modes", nargs="+", default=["last", "full"], choices=["last", "full"],
                        help="last: positions=last; full: positions=all")
    parser.add_argument("--shortlist", type=int, default=0,
                        help="also time positions=all with fit.dim.shortlist=N (last position first, then N layers)")
    parser.add_argument("--batch-size", type=int, default=32, help="fit.dim.batch_size")
    args = C.parse(parser, argv)
    sizes = dict(n_train=16, n_val=8, n_test=8) if args.smoke else dict(n_train=64, n_val=24, n_test=48)
    bundle = C.load_bundle(args.model, args.device)
    device = bundle.device
    splits = C.embedded_splits(**sizes)
    tok = {name: bundle.tokenize_instructions(getattr(splits, name))
           for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    n_pos = len(bundle.post_instruction_ids)
    cache = ActivationCache(C.cache_dir() / "activations")
    batch = int(C.model_config(args.model).get("batch_size", 16))
    t0 = time.perf_counter()
    harm = cache.get(bundle, tok["harmful_train"], n_pos, batch_size=batch, progress=False)
    safe = cache.get(bundle, tok["harmless_train"], n_pos, batch_size=batch, progress=False)
    activations_s = time.perf_counter() - t0
    candidates = dim_candidates(harm, safe)[: bundle.n_layers]

    modes = {m: SelectionConfig(positions="last" if m == "last" else "all", batch_size=args.batch_size) for m in args.modes}
    if args.shortlist > 0:
        modes[f"shortlist{args.shortlist}"] = SelectionConfig(positions="all", shortlist=args.shortlist,
                                                              batch_size=args.batch_size)
    rows, figures = [], {}
    for mode, cfg in modes.items():
        seconds = []
        for _ in range(args.repeats):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                scorer = CandidateScorer(bundle, tok["harmful_val"], tok["harmless_val"], batch_size=cfg.batch_size,
                                         progress=False)
                result = select_direction(candidates, scorer, cfg)
                C.sync(device)
                seconds.append(time.perf_counter() - t0)
        med = C.median(seconds)
        rows.append({"mode": mode, "positions": cfg.positions, "candidates": result.scored, "median_s": med,
                     "s_per_candidate": med / max(1, result.scored), "layer": result.layer,
                     "position": result.position, "passed_filters": result.passed_filters,
                     "runs_s": " ".join(f"{t:.2f}" for t in seconds)})
        figures.update({f"{mode}_candidates": result.scored, f"{mode}_s": med,
                        f"{mode}_s_per_candidate": med / max(1, result.scored),
                        f"{mode}_pick": f"L{result.layer}P{result.position}"})
        if caught:
            figures[f"{mode}_notes"] = "; ".join(sorted({str(w.message)[:80] for w in caught}))
    if "full_s" in figures and "last_s" in figures:
        figures["full_over_last_ratio"] = figures["full_s"] / figures["last_s"]
    C.print_table(
        f"{bundle.name} on {device}: DiM selection, val {len(tok['harmful_val'])}+{len(tok['harmless_val'])} prompts, "
        f"{bundle.n_layers} layers x {n_pos} positions (activations {activations_s:.1f}s, cached after the first run)",
        rows,
    )
    figures = {"n_val": len(tok["harmful_val"]), "n_positions": n_pos, "repeats": args.repeats,
               "activations_s": activations_s, **figures, **C.peak_memory(device)}
    C.print_table("memory", [{k: v for k, v in figures.items() if k.startswith("peak_")}])
    path = C.append_row(NAME, args, device, figures)
    if path:
        print(f"\nappended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
