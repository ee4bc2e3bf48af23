"""Step 3 of the gold set: the labelled passes into the packaged gold file, with the agreement between passes.

    python bench/gold/assemble.py --work bench/gold/work --first pass1.jsonl --second pass2.jsonl \
        --labellers "first: ...; second: ..."

Reads the blind items (``to_label.jsonl``), their key (``key.jsonl``) and each pass's labels (JSONL: id,
label, answers_prompt, optional note); writes ``src/refusal/judges/gold/gold.jsonl`` (the first pass's labels,
the key's strata, a seeded 50/50 dev/test split stratified by model and label) and ``README.md`` beside it
(counts per stratum, Cohen's κ between the passes with its interval, the disagreements).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLD_DIR = REPO / "src" / "refusal" / "judges" / "gold"


def _read(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


def _split(item_id: str, stratum: tuple, order: dict[tuple, list[str]]) -> str:
    """Alternate dev/test within each stratum in the order of a hash of the id (seedless, reproducible)."""
    return "dev" if order[stratum].index(item_id) % 2 == 0 else "test"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "gold" / "work")
    parser.add_argument("--first", type=Path, required=True, help="the first pass's labels (every item)")
    parser.add_argument("--second", type=Path, help="the second pass's labels (a sample)")
    parser.add_argument("--labellers", required=True, help="who labelled each pass, for the README")
    parser.add_argument("--out", type=Path, default=GOLD_DIR)
    args = parser.parse_args(argv)

    from refusal.judges.accuracy import kappa_with_se
    from refusal.judges.labelled import GOLD_LABELS, parse_labelled

    items, key = _read(args.work / "to_label.jsonl"), _read(args.work / "key.jsonl")
    first = _read(args.work / args.first if not args.first.is_absolute() else args.first)
    missing = sorted(set(items) - set(first))
    if missing:
        raise SystemExit(f"the first pass lacks {len(missing)} items (e.g. {missing[:3]}); label every item")
    order: dict[tuple, list[str]] = {}
    for item_id in sorted(items, key=lambda i: hashlib.sha256(i.encode()).hexdigest()):
        order.setdefault((key[item_id]["model"], first[item_id]["label"]), []).append(item_id)
    rows = []
    for item_id in sorted(items):
        k, lab = key[item_id], first[item_id]
        rows.append({"id": item_id, "prompt": items[item_id]["prompt"], "completion": items[item_id]["completion"],
                     "label": lab["label"], "answers_prompt": bool(lab.get("answers_prompt")),
                     "split": _split(item_id, (k["model"], lab["label"]), order),
                     **{f: k[f] for f in ("model", "intervention", "column", "budget")},
                     **({"note": lab["note"]} if lab.get("note") else {})})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    parse_labelled(text, "jsonl", "gold.jsonl")  # the file passes the validator's own checks
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gold.jsonl").write_text(text, encoding="utf-8")

    lines = ["# The project's gold set of refusal judgements", "",
             f"{len(rows)} completions of our own models, labelled by reading them under docs/GOLD_LABELLING.md "
             "(blind to model, method, budget and judges). Made by `bench/gold/sample.py` (drawing from `bench/study.py`'s "
             "main runs) and `bench/gold/assemble.py`. Licence: the completions are model outputs made by this project; "
             "the prompts come from the refusal_direction splits (Apache-2.0), StrongREJECT (MIT; the prompts it took from "
             "earlier sets keep their licences) and this project's over-refusal set.", "",
             f"Labellers: {args.labellers}.", "",
             "| stratum | " + " | ".join(GOLD_LABELS) + " | answers the prompt |", "|---|" + "---|" * (len(GOLD_LABELS) + 1)]
    for field in ("model", "intervention", "column", "budget", "split"):
        for value in sorted({str(r[field]) for r in rows}):
            sub = [r for r in rows if str(r[field]) == value]
            counts = Counter(r["label"] for r in sub)
            lines.append(f"| {field}={value} | " + " | ".join(str(counts[g]) for g in GOLD_LABELS)
                         + f" | {sum(r['answers_prompt'] for r in sub)} of {len(sub)} |")
    if args.second:
        second = _read(args.work / args.second if not args.second.is_absolute() else args.second)
        both = sorted(set(second) & set(first))
        idx = {g: i for i, g in enumerate(GOLD_LABELS)}
        three = [[0] * 3 for _ in range(3)]
        binary = [[0] * 2 for _ in range(2)]
        for i in both:
            a, b = first[i]["label"], second[i]["label"]
            three[idx[a]][idx[b]] += 1
            binary[int(a == "compliance")][int(b == "compliance")] += 1
        k3, se3 = kappa_with_se(three)
        k2, se2 = kappa_with_se(binary)
        raw3 = sum(three[i][i] for i in range(3)) / len(both)
        raw2 = (binary[0][0] + binary[1][1]) / len(both)
        lines += ["", f"## Agreement between the passes ({len(both)} items labelled twice)", "",
                  f"- three labels: raw agreement {raw3:.1%}, Cohen's κ {k3:.2f} [{max(-1, k3 - 1.96 * se3):.2f}, {min(1, k3 + 1.96 * se3):.2f}]",
                  f"- refusal (incl. partial) vs compliance, as the judges are scored: raw {raw2:.1%}, κ {k2:.2f} "
                  f"[{max(-1, k2 - 1.96 * se2):.2f}, {min(1, k2 + 1.96 * se2):.2f}]",
                  "", "Confusion (rows: first pass, columns: second; " + ", ".join(GOLD_LABELS) + "):", "",
                  *(f"    {GOLD_LABELS[r]:>15}: {three[r]}" for r in range(3)), "", "Disagreements:", ""]
        for i in both:
            if first[i]["label"] != second[i]["label"]:
                lines.append(f"- `{i}` first {first[i]['label']}, second {second[i]['label']}"
                             + (f" ({second[i].get('note') or first[i].get('note')})" if second[i].get("note") or first[i].get("note") else ""))
    (args.out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'gold.jsonl'} ({len(rows)} rows) and {args.out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
