"""Greedy decoding throughput of each path, as ratios to today's float32 path measured in the same run.

Paths (each on the same prompts, half harmful and half harmless, one batch of ``rows`` prompts):

- ``transformers-float32``: ``transformers``' ``generate`` on the float32 model, the path the project
  used until issue 24 (the reference of every ratio; run at ``--reference-rows``, 64 by default,
  the old ``eval.batch_size``, since it slows down with larger batches);
- ``refusal-float32``: our loop (``refusal.runtime.decoding``), exact: its completions must equal the
  reference's (the column ``same_as_reference``);
- ``refusal-bf16-matmul``: ``model.matmul=bfloat16`` (float32 model, bfloat16 products);
- ``refusal-bfloat16``: ``model.dtype=bfloat16`` (the whole model in bfloat16).

Beside each figure: the share of completions identical to float32's (whole and in their first 40
characters), and the machine's limits measured in the same run: read bandwidth (a float32 sum over
1 GiB) and float32/bfloat16 matrix-product throughput, turned into the tokens/s a decoding step
bounded by reading every weight once, or by its arithmetic, would reach at that batch size.

    python bench/bench_generation.py --model qwen05                       # rows 64 128 256, tokens 64 256
    python bench/bench_generation.py --model qwen05 --rows 64 --tokens 64 # one cell
    python bench/bench_generation.py --smoke
"""

from __future__ import annotations

import time
from typing import Any

import _common as C
import torch

NAME = "generation"
TARGET = C.TARGETS[NAME]
PATHS = {  # name: (engine, model config overrides)
    "transformers-float32": ("transformers", {}),
    "refusal-float32": ("refusal", {}),
    "refusal-bf16-matmul": ("refusal", {"matmul": "bfloat16"}),
    "refusal-bfloat16": ("refusal", {"dtype": "bfloat16"}),
}
REFERENCE, EXACT = "transformers-float32", "refusal-float32"


def machine_limits(device: torch.device | str = "cpu") -> dict[str, float]:
    """Read bandwidth (GB/s) and float32 / bfloat16 matrix-product throughput (GFLOP/s) of ``device``, best of 3."""

    def best(fn, n: int = 3) -> float:
        fn()  # warm-up (a GPU's first product also picks its kernel)
        return min(C.timed(fn, device) for _ in range(n))

    x = torch.ones(1 << 28, device=device)  # 1 GiB of float32
    bandwidth = x.numel() * 4 / best(x.sum) / 1e9
    del x
    a, b = torch.randn(256, 2048, device=device), torch.randn(8192, 2048, device=device)
    flops = 2 * 256 * 2048 * 8192
    f32 = flops / best(lambda: torch.nn.functional.linear(a, b)) / 1e9
    ab, bb = a.bfloat16(), b.bfloat16()
    bf16 = flops / best(lambda: torch.nn.functional.linear(ab, bb)) / 1e9
    return {"read_gb_s": bandwidth, "float32_gflop_s": f32, "bfloat16_gflop_s": bf16}


def step_bounds(n_params: int, rows: int, limits: dict[str, float], dtype: str) -> dict[str, float]:
    """tokens/s if a decoding step cost only reading the weights (stored in ``dtype``) once, or only their
    arithmetic in ``dtype``."""
    nbytes = 4 if dtype == "float32" else 2
    return {"bandwidth_bound_tok_s": rows / (n_params * nbytes / (limits["read_gb_s"] * 1e9)),
            "compute_bound_tok_s": limits[f"{dtype}_gflop_s"] * 1e9 / (2 * n_params)}


def other_passes(bundle, ids: list[list[int]], runs: dict) -> dict[str, float]:
    """Wall seconds of activation extraction over ``ids`` and of teacher-forced scoring of the float32
    path's completions of them (the unsteered model), so each path's figures sit beside float32's."""
    from refusal.evaluation.scoring import teacher_forced_scores
    from refusal.runtime.activations import extract_activations

    exact = next(g for (p, rows, _), g in sorted(runs.items(), key=lambda kv: kv[0][2]) if p == EXACT and rows >= len(ids))
    completions = exact.completion_ids[: len(ids)]
    out = {}
    t0 = time.perf_counter()
    extract_activations(bundle, ids, len(bundle.post_instruction_ids), batch_size=32, progress=False)
    out["extraction"] = time.perf_counter() - t0
    bundle.memo.pop("unsteered_logits", None)
    t0 = time.perf_counter()
    teacher_forced_scores(bundle, ids, completions, None, batch_size=32)
    out["scoring"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    from refusal.models import load_model
    from refusal.models.loader import resolve_device
    from refusal.runtime.generation import generate

    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="batch sizes (default 64 128 256; smoke 4 8)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="new-token budgets (default 64 256; smoke 8)")
    parser.add_argument("--reference-rows", type=int, nargs="+", default=None,
                        help="batch sizes the reference runs at (default 64; smoke 4)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    args = C.parse(parser, argv)
    rows_grid = args.rows or ([4, 8] if args.smoke else [64, 128, 256])
    tokens_grid = args.tokens or ([8] if args.smoke else [64, 256])
    reference_rows = args.reference_rows or ([4] if args.smoke else [64])
    paths = [REFERENCE, EXACT, *(p for p in args.paths if p not in (REFERENCE, EXACT))]
    n_max = max(rows_grid + reference_rows)
    instructions = C.mixed_instructions(n_max)
    limits = machine_limits(resolve_device(str(C.model_config(args.model, args.device).get("device") or "cpu")))
    print(f"limits: {limits}", flush=True)

    table: list[dict[str, Any]] = []
    figures: dict[str, Any] = {**{k: round(v, 2) for k, v in limits.items()}}
    runs: dict[tuple[str, int, int], Any] = {}
    device = None
    for path in paths:
        engine, overrides = PATHS[path]
        bundle = load_model({**C.model_config(args.model, args.device), **overrides}, C.cache_dir())
        device = bundle.device
        ids_all = bundle.tokenize_instructions(instructions)
        generate(bundle, ids_all[:4], max_new_tokens=4, batch_size=4, progress=False, engine=engine)  # warm-up
        n_params = sum(p.numel() for p in bundle.model.parameters())
        for tokens in tokens_grid:
            for rows in (reference_rows if path == REFERENCE else rows_grid):
                ids = ids_all[:rows]
                C.sync(device)
                t0 = time.perf_counter()
                gens = generate(bundle, ids, max_new_tokens=tokens, batch_size=rows, progress=False, engine=engine)
                C.sync(device)
                wall = time.perf_counter() - t0
                runs[path, rows, tokens] = gens
                n_tokens = sum(len(c) for c in gens.completion_ids)
                row: dict[str, Any] = {"path": path, "rows": rows, "tokens": tokens, "wall_s": wall,
                                       "new_tokens": n_tokens, "tok_s": n_tokens / wall}
                table.append(row)
                print(f"{path} rows={rows} tokens={tokens}: {wall:.1f} s, {n_tokens / wall:.1f} tok/s", flush=True)
        figures["n_params"] = n_params
        if engine == "refusal":  # the other passes a run makes, on the same bundle: extraction and scoring
            for name, seconds in other_passes(bundle, ids_all[:reference_rows[0]], runs).items():
                figures[f"{path}_{name}_s"] = seconds
                print(f"{path}: {name} {seconds:.1f} s", flush=True)
        head = bundle.memo.get("greedy_head")  # how often the bfloat16 screen could not settle a row
        if engine == "refusal" and head is not None and head.rows:
            figures[f"{path}_rows_computed_whole"] = head.rows_whole / head.rows
            print(f"{path}: {head.rows_whole} of {head.rows} screened rows computed whole", flush=True)
        del bundle
    for row in table:
        refs = {r["rows"]: r for r in table if r["path"] == REFERENCE and r["tokens"] == row["tokens"]}
        ref = refs.get(row["rows"], refs.get(reference_rows[0]))
        exact = runs.get((EXACT, row["rows"], row["tokens"]))
        gens = runs[row["path"], row["rows"], row["tokens"]]
        row["ratio"] = row["tok_s"] / ref["tok_s"] if ref else float("nan")
        if exact is not None:
            row["same"] = sum(a == b for a, b in zip(gens.completion_ids, exact.completion_ids, strict=True)) / row["rows"]
            row["same_40_chars"] = sum(a[:40] == b[:40] for a, b in zip(gens.completions, exact.completions, strict=True)) / row["rows"]
        row.update(step_bounds(figures["n_params"], row["rows"], limits, "float32" if row["path"].endswith("float32") else "bfloat16"))
        key = f"{row['path']}_{row['rows']}x{row['tokens']}"
        figures.update({f"{key}_tok_s": row["tok_s"], f"{key}_ratio": row["ratio"],
                        f"{key}_same_40_chars": row.get("same_40_chars", "")})
    reference = [r for r in table if r["path"] == REFERENCE and "same" in r]
    if reference:
        figures["exact_path_equals_reference"] = int(all(r["same"] == 1 for r in reference))
        print(f"refusal-float32 completions equal transformers-float32's: {bool(figures['exact_path_equals_reference'])}")
    C.print_table(f"{args.model}: greedy decoding, tokens/s (new tokens up to end of turn ÷ wall) and ratio to "
                  f"{REFERENCE} at {reference_rows[0]} rows, same budget; target ≥ {TARGET}×", table)
    figures.update(C.peak_memory(device))
    C.append_row(NAME, args, device, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
