"""Does ``model.matmul=bfloat16`` change the study's numbers? The README's comparison run twice, float32 and
bfloat16 products, on the same prompts, side by side.

Runs ``evaluate.py experiment=compare`` (baseline, DiM ablation, actadd, INLP nullspace, INLP flip) once per
setting, each fitting its own DiM direction and INLP (selection included), then compares per run: refusal
rates (with the paired difference bfloat16 − float32 over the same prompts and its 95% interval), harmless
perplexity and next-token KL (each with its own interval), and the fits: the DiM pick, the cosine between the
two directions, the INLP rank; plus the share of completions identical in their first 40 characters.
Writes ``docs/results/numerics_<model>.md`` and appends a row to ``bench/results/numerics.csv``.

    python bench/compare_numerics.py --model qwen05                   # 128 new tokens
    python bench/compare_numerics.py --model qwen05 --tokens 32 --out /tmp/numerics
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

from refusal.run_files import read_completions

NAME = "numerics"
SETTINGS = ("float32", "bfloat16")


def run_compare(model: str, matmul: str, tokens: int, out: Path, extra: list[str]) -> float:
    """One ``experiment=compare`` multirun into ``out/<matmul>``; its wall time."""
    cmd = [sys.executable, str(C.REPO / "evaluate.py"), "experiment=compare", f"model={model}", f"model.matmul={matmul}",
           f"eval.max_new_tokens={tokens}", f"hydra.sweep.dir={out / matmul}", "logger=none", "progress=false",
           f"cache_dir={C.cache_dir()}", *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=C.REPO)
    wall = time.perf_counter() - t0
    (out / matmul / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return wall


def runs_of(folder: Path) -> dict[str, Path]:
    """intervention name -> job folder of one multirun."""
    out = {}
    for results in sorted(folder.glob("*/results.json")):
        record = json.loads(results.read_text())
        if record.get("status") == "ok":
            out[record["intervention"]] = results.parent
    return out


def direction(artifacts: Path, model: str, numerics_suffix: str):
    """The DiM artifact (direction, layer, position) a run of these numerics fitted."""
    from safetensors.torch import load_file

    stems = [p for p in (artifacts / model).glob("*/dim_*.safetensors")
             if (numerics_suffix in p.parent.name if numerics_suffix else "bfloat16" not in p.parent.name)]
    if len(stems) != 1:
        raise SystemExit(f"expected one DiM artifact under {artifacts / model} for {numerics_suffix or 'float32'}, "
                         f"found {len(stems)}: use a fresh --artifacts folder")
    meta = json.loads(stems[0].with_suffix(".json").read_text())["meta"]
    return load_file(stems[0])["direction"].double(), meta


def first40(folder: Path) -> dict[tuple[str, str], str]:
    rows = read_completions(folder)
    return {(r["split"], r["prompt"]): r["completion"][:40] for r in rows}


def main(argv: list[str] | None = None) -> int:
    from refusal.compare import RunOutcomes, refusal_vs
    from refusal.stats.paired import check_same_prompts

    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="eval.max_new_tokens (default 128)")
    parser.add_argument("--out", type=Path, default=C.REPO / "multirun" / "numerics", help="where both multiruns go")
    parser.add_argument("--docs", type=Path, default=None, help="the Markdown table (default docs/results/numerics_<model>.md)")
    parser.add_argument("--skip-runs", action="store_true", help="compare the runs already in --out (their walls from wall_s.txt)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, e.g. data.n_test=48")
    args = C.parse(parser, argv)
    artifacts = args.out / "artifacts"
    extra = [f"artifacts_dir={artifacts}", *args.overrides, *([f"model.device={args.device}"] if args.device else [])]
    walls = {m: float((args.out / m / "wall_s.txt").read_text()) if args.skip_runs else
             run_compare(args.model, m, args.tokens, args.out, extra) for m in SETTINGS}
    runs = {m: runs_of(args.out / m) for m in SETTINGS}
    (d32, m32), (d16, m16) = direction(artifacts, args.model, ""), direction(artifacts, args.model, "bfloat16-matmul")
    cosine = float(d32 @ d16 / (d32.norm() * d16.norm()))
    table: list[dict[str, Any]] = []
    inlp_rank: dict[str, Any] = {}
    for name in runs["float32"]:
        if name not in runs["bfloat16"]:
            continue
        a, b = (json.loads((runs[m][name] / "results.json").read_text()) for m in ("bfloat16", "float32"))
        # refusal only: perplexity pairs runs scored on the same unsteered completions, which differ here
        fast, exact = RunOutcomes.from_dir(runs["bfloat16"][name]), RunOutcomes.from_dir(runs["float32"][name])
        paired = {}
        for column in exact.refused:
            check_same_prompts(fast.digests[column], exact.digests[column], f"the two runs' {column} prompts")
            paired.update(refusal_vs(fast.refused[column], exact.refused[column], column, "float32"))
        texts = first40(runs["bfloat16"][name]), first40(runs["float32"][name])
        same = sum(texts[0][k] == texts[1].get(k) for k in texts[0]) / len(texts[0])
        for m, rec in (("float32", b), ("bfloat16", a)):
            if "inlp" in rec:
                inlp_rank[m] = rec["inlp"]["rank"]
        row: dict[str, Any] = {"run": name}
        for column in ("harmful", "harmless", "overrefusal"):
            key = f"{column}/refusal_rate"
            if key in a["metrics"]:
                lo, hi = paired[f"{column}/refusal_rate_vs_float32_ci95"]
                row[column] = (f"{100 * b['metrics'][key]:.1f}% → {100 * a['metrics'][key]:.1f}% "
                               f"(Δ {100 * paired[f'{column}/refusal_rate_vs_float32']:+.1f} [{100 * lo:+.0f}, {100 * hi:+.0f}])")
        for key in ("harmless/perplexity", "harmless/kl_div"):
            row[key.split("/")[1]] = f"{b['metrics'].get(key, float('nan')):.3g} → {a['metrics'].get(key, float('nan')):.3g}"
        row["same first 40 chars"] = f"{100 * same:.0f}%"
        table.append(row)
    fits = (f"DiM pick float32 L{m32['layer']}P{m32['position']} vs bfloat16 L{m16['layer']}P{m16['position']}; "
            f"cosine of the two directions {cosine:.5f}; INLP rank float32 {inlp_rank.get('float32')} vs bfloat16 "
            f"{inlp_rank.get('bfloat16')}; wall (cold fits, {args.tokens} tokens) float32 {walls['float32']:.0f} s, "
            f"bfloat16 {walls['bfloat16']:.0f} s")
    C.print_table(f"{args.model}: model.matmul float32 → bfloat16 (paired Δ over the same prompts, 95% interval)", table)
    print(fits)
    docs = args.docs or C.REPO / "docs" / "results" / f"numerics_{args.model}.md"
    cols = list(table[0])
    lines = [f"# `model.matmul=bfloat16` vs float32 on {args.model}", "",
             f"Generated by `{C.command_line()}` ({time.strftime('%Y-%m-%d')}): `experiment=compare` at "
             f"{args.tokens} new tokens, run once per setting on the same prompts. Each cell: float32 → bfloat16; Δ is "
             "the paired difference of refusal rates (bfloat16 − float32, Newcombe's interval, points).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             *("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in table), "", fits, ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {docs}")
    C.append_row(NAME, args, "cpu" if not args.device else args.device, {
        "tokens": args.tokens, "dim_cosine": cosine, "dim_pick_float32": f"L{m32['layer']}P{m32['position']}",
        "dim_pick_bfloat16": f"L{m16['layer']}P{m16['position']}", "inlp_rank_float32": inlp_rank.get("float32"),
        "inlp_rank_bfloat16": inlp_rank.get("bfloat16"), "float32_wall_s": walls["float32"], "bfloat16_wall_s": walls["bfloat16"],
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
