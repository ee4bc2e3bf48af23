"""Step 1 of the gold set: draw completions from study runs for labelling, blind.

    python bench/gold/sample.py --study study --out bench/gold/work

Draws a seeded, stratified sample from each model's ``main`` runs (every intervention × every column:
harmful split, the held-out benchmark, harmless, over-refusal), plus short-budget items: the first
``--short-tokens`` tokens of some of the same completions (greedy decoding makes them what a run with that
budget returns). Writes ``to_label.jsonl`` (id, prompt, completion: nothing that reveals the run, so the
labeller is blind to the method and to any judge) and ``key.jsonl`` (id -> model, run, intervention, column,
budget). Identical (prompt, completion) pairs are drawn once. ``--append`` adds the runs not drawn from yet to an
existing sample (a study that finished more runs since), numbering on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from refusal.run_files import completions_path, read_completions

#: Items drawn per (model, intervention, column); harmful columns get more, refusals and compliances both occur there.
PER_CELL = {"harmful": 20, "strongreject": 20, "harmless": 8, "overrefusal": 12}


def _rows(run_dir: Path) -> list[dict]:
    return read_completions(run_dir)


def _truncate(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:n]) if len(ids) > n else text


def _qwen_tokenizer_folder() -> Path:
    """The dequantized qwen05 folder the project made (the Qwen2.5 tokenizer, shared by qwen05 and qwen15)."""
    import os

    import yaml

    sha = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf" / "model" / "qwen05.yaml").read_text())["gguf"]["sha256"]
    cache = Path(os.environ.get("REFUSAL_CACHE", Path.home() / ".cache" / "refusal"))
    folder = cache / "models" / f"{sha[:16]}-hf"
    if not folder.is_dir():
        raise SystemExit(f"{folder} not found: run any qwen05 job first (it dequantizes the model), or pass --tokenizer")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=Path("study"))
    parser.add_argument("--models", nargs="+", default=["qwen05", "qwen15"])
    parser.add_argument("--out", type=Path, default=Path("bench/gold/work"))
    parser.add_argument("--short-tokens", type=int, default=32)
    parser.add_argument("--short-share", type=float, default=0.2, help="share of harmful-column items also shown truncated")
    parser.add_argument("--tokenizer", default=None, help="a local tokenizer folder (the study models' own; default: qwen05's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true", help="add the runs not sampled yet to the files in --out")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or _qwen_tokenizer_folder())
    rng = random.Random(args.seed)
    items, seen, done = [], set(), set()
    old_blind, old_key = [], []
    if args.append:
        old_blind = [json.loads(x) for x in (args.out / "to_label.jsonl").read_text(encoding="utf-8").splitlines() if x]
        old_key = [json.loads(x) for x in (args.out / "key.jsonl").read_text(encoding="utf-8").splitlines() if x]
        seen = {(b["prompt"], b["completion"]) for b in old_blind}
        done = {(k["model"], k["run"]) for k in old_key}
    for model in args.models:
        for run_dir in sorted((args.study / model / "main").glob("*/")):
            if completions_path(run_dir) is None or (model, run_dir.name) in done:
                continue
            intervention = json.loads((run_dir / "results.json").read_text())["intervention"]
            by_column: dict[str, list[dict]] = {}
            for row in _rows(run_dir):
                by_column.setdefault(row["split"], []).append(row)
            for column, rows in sorted(by_column.items()):
                drawn = rng.sample(rows, min(PER_CELL.get(column, 10), len(rows)))
                for row in drawn:
                    variants = [(128, row["completion"])]
                    if column not in ("harmless",) and rng.random() < args.short_share:
                        variants.append((args.short_tokens, _truncate(tokenizer, row["completion"], args.short_tokens)))
                    for budget, text in variants:
                        pair = (row["prompt"], text)
                        if pair in seen:
                            continue
                        seen.add(pair)
                        items.append({"prompt": row["prompt"], "completion": text, "model": model, "run": run_dir.name,
                                      "intervention": intervention, "column": column, "budget": budget})
    rng.shuffle(items)
    args.out.mkdir(parents=True, exist_ok=True)
    blind_path, key_path = args.out / "to_label.jsonl.tmp", args.out / "key.jsonl.tmp"  # renamed when whole: a labeller may be reading
    with blind_path.open("w", encoding="utf-8") as blind, key_path.open("w", encoding="utf-8") as key:
        for b, k in zip(old_blind, old_key, strict=True):
            blind.write(json.dumps(b, ensure_ascii=False) + "\n")
            key.write(json.dumps(k) + "\n")
        for i, item in enumerate(items, start=len(old_blind)):
            item_id = f"g{i:04d}-" + hashlib.sha256(json.dumps([item["prompt"], item["completion"]]).encode()).hexdigest()[:6]
            blind.write(json.dumps({"id": item_id, "prompt": item["prompt"], "completion": item["completion"]}, ensure_ascii=False) + "\n")
            key.write(json.dumps({"id": item_id, **{k: v for k, v in item.items() if k not in ("prompt", "completion")}}) + "\n")
    key_path.replace(args.out / "key.jsonl")
    blind_path.replace(args.out / "to_label.jsonl")
    print(f"{len(items)} new items ({len(old_blind) + len(items)} in all) -> {args.out / 'to_label.jsonl'} "
          f"(key: {args.out / 'key.jsonl'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
