"""Wall time of DiM direction selection: every candidate vs. the shortlist train.py uses.

Selection scores each candidate direction (one per eligible layer and post-instruction position)
on val prompts: bypass and KL under directional ablation, induce under activation addition. Modes,
all with the product's settings from conf/fit/default.yaml (n_prompts, batch_size, filters):

* ``full``: every eligible layer × position (positions=all, shortlist=0; Arditi et al.);
* ``shortlist``: train.py's default (last position for every layer, then all positions of the
  best ``shortlist`` layers);
* ``last``: the last position only (positions=last).

Each mode runs with both scorers in the same process: ``plain`` (every prompt token through the
model for every candidate, the code before prefix sharing) and ``shared`` (the prompts' common
chat-template prefix once per candidate, then each prompt from its cache; the default). The row
records the speed-up and whether both picked the same winner.

Activations come from the pipeline's on-disk cache (computed once if missing, timed separately), so
the figures are selection alone: CandidateScorer (which computes the unsteered val logits) plus
select_direction, exactly as pipeline.fit_dim runs them.

    python bench/bench_selection.py --model qwen05 --modes shortlist
    python bench/bench_selection.py --model qwen15 --modes shortlist last
    python bench/bench_selection.py --smoke
"""

from __future__ import annotations

import time
import warnings

import _common as C
import yaml

from refusal.fitting.dim import CandidateScorer, SelectionConfig, dim_candidates_from_means, select_direction
from refusal.runtime.activations import ActivationCache

NAME = "selection"


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(repeats=1)
    parser.add_argument("--modes", nargs="+", default=["shortlist", "full", "last"], choices=["shortlist", "full", "last"])
    parser.add_argument("--shortlist", type=int, default=None, help="layers shortlisted (default: fit.dim.shortlist)")
    parser.add_argument("--n-prompts", type=int, default=None, help="val prompts per class (default: fit.dim.n_prompts)")
    parser.add_argument("--scorers", nargs="+", default=["plain", "shared"], choices=["plain", "shared"])
    args = C.parse(parser, argv)
    dim = yaml.safe_load((C.REPO / "conf" / "fit" / "default.yaml").read_text())["dim"]
    # the smoke model's prune rule (int(4·0.8) = 3 layers, layer 0 degenerate) leaves 2 scorable layers: a shortlist
    # of 1 keeps it a strict subset of full there
    shortlist = args.shortlist if args.shortlist is not None else (1 if args.smoke else int(dim["shortlist"]))
    n_prompts = args.n_prompts or dim.get("n_prompts") or None
    sizes = dict(n_train=16, n_val=8, n_test=8) if args.smoke else dict(n_train=64, n_val=24, n_test=48)
    bundle = C.load_bundle(args.model, args.device)
    device = bundle.device
    splits = C.embedded_splits(**sizes)
    tok = {name: bundle.tokenize_instructions(getattr(splits, name))
           for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    harmful_val, harmless_val = tok["harmful_val"][:n_prompts], tok["harmless_val"][:n_prompts]
    n_pos = len(bundle.post_instruction_ids)
    cache = ActivationCache(C.cache_dir() / "activations")
    batch = int(C.model_config(args.model).get("batch_size", 16))
    t0 = time.perf_counter()
    harm = cache.mean(bundle, tok["harmful_train"], n_pos, batch_size=batch, progress=False)  # streamed, as fit_dim
    safe = cache.mean(bundle, tok["harmless_train"], n_pos, batch_size=batch, progress=False)
    activations_s = time.perf_counter() - t0
    candidates = dim_candidates_from_means(harm, safe)[: bundle.n_layers]

    settings = {"full": dict(positions="all", shortlist=0), "shortlist": dict(positions="all", shortlist=shortlist),
                "last": dict(positions="last", shortlist=0)}
    modes = {m: SelectionConfig(**{**dim, "n_prompts": n_prompts, **settings[m]}) for m in args.modes}  # as fit_dim
    warm = CandidateScorer(bundle, harmful_val[:2], harmless_val[:2], progress=False)  # untimed: first hooked passes
    warm.score(candidates[1:2, -1], [1])
    rows, figures = [], {}
    for mode, cfg in modes.items():
        for scorer_name in args.scorers:
            seconds = []
            for _ in range(args.repeats):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    t0 = time.perf_counter()
                    scorer = CandidateScorer(bundle, harmful_val, harmless_val, batch_size=cfg.batch_size,
                                             progress=False, share_prefix=scorer_name == "shared")
                    result = select_direction(candidates, scorer, cfg)
                    C.sync(device)
                    seconds.append(time.perf_counter() - t0)
            med = C.median(seconds)
            pick = f"L{result.layer}P{result.position}"
            rows.append({"mode": mode, "scorer": scorer_name, "prefix_tokens": len(scorer.prefix),
                         "candidates": result.scored, "median_s": med, "s_per_candidate": med / max(1, result.scored),
                         "pick": pick, "passed_filters": result.passed_filters,
                         "runs_s": " ".join(f"{t:.2f}" for t in seconds)})
            tag = f"{mode}_{scorer_name}"
            figures.update({f"{tag}_candidates": result.scored, f"{tag}_s": med,
                            f"{tag}_s_per_candidate": med / max(1, result.scored), f"{tag}_pick": pick})
            print(f"{mode}/{scorer_name}: {result.scored} candidates in {med:.1f}s, picked {pick}", flush=True)
            if caught:
                figures[f"{tag}_notes"] = "; ".join(sorted({str(w.message)[:80] for w in caught}))
        if {"plain", "shared"} <= set(args.scorers):
            figures[f"{mode}_shared_over_plain"] = figures[f"{mode}_shared_s"] / figures[f"{mode}_plain_s"]
            figures[f"{mode}_same_pick"] = figures[f"{mode}_plain_pick"] == figures[f"{mode}_shared_pick"]
            print(f"{mode}: shared prefix {1 / figures[f'{mode}_shared_over_plain']:.2f}x faster, same pick: "
                  f"{figures[f'{mode}_same_pick']}", flush=True)
    C.print_table(
        f"{bundle.name} on {device}: DiM selection, val {len(harmful_val)}+{len(harmless_val)} prompts, "
        f"{bundle.n_layers} layers x {n_pos} positions (activations {activations_s:.1f}s, cached after the first run)",
        rows,
    )
    figures = {"n_val": len(harmful_val), "shortlist_layers": shortlist, "n_positions": n_pos, "repeats": args.repeats,
               "activations_s": activations_s, **figures, **C.peak_memory(device)}
    C.print_table("memory", [{k: v for k, v in figures.items() if k.startswith("peak_")}])
    C.append_row(NAME, args, device, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
