"""Every trial of both searches counted the peer's own way: the check behind "same judge".

The study compares the fronts under our judge. Each peer optimised its own count instead: heretic its markers
(which our ``heretic`` judge reproduces), abliterix its markers anywhere in the completion ("illegal",
"harmful", "unethical" included) plus a degenerate-output rule (repeated sentences or n-grams count as refusals).
This runs the peer's own rule, through its driver in its own venv, on our searches' harmful completions (the pareto
step's INLP-flip search and references, and its heretic-kernel search) and on the peer's recorded ones. The peer's recount must equal what it counted in its study, or nothing is written.
The result, ``peer_count.json`` in the peer's run folder, is read by the study's Pareto section.

    python bench/peers/peer_count.py study/peers/qwen05-abliterix [--ours study/qwen05/pareto study/qwen05/pareto_weighted]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from peer_env import HERE, installed_python, peer_env
from peer_inputs import PeerInputError
from peer_readback import PeerOutputError, load_records

from refusal.artifacts import atomic_write_json
from refusal.run_files import read_completions

COUNTS = "peer_count.json"


def texts_to_judge(run_dir: Path, ours_dirs: Sequence[Path]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``{name: completions}`` for the peer's recorded trials (``peer/<record key>``) and each of our runs in
    ``ours_dirs`` (``ours/<run>``: its harmful completions), and the peer's recorded count per ``peer/`` name."""
    texts, recorded = {}, {}
    for key, rec in sorted(load_records(run_dir / "completions.jsonl").items()):
        if "responses" in rec:
            texts[f"peer/{key}"], recorded[f"peer/{key}"] = list(rec["responses"]), int(rec["refusals"])
    for run in sorted(p.parent for ours_dir in ours_dirs for p in ours_dir.glob("*/results.json")):
        rows = [r["completion"] for r in read_completions(run) if r.get("split") == "harmful"]
        if rows:
            if f"ours/{run.name}" in texts:
                raise PeerOutputError(f"two of our runs are named {run.name} (in {', '.join(map(str, ours_dirs))}); "
                                      "count one folder at a time")
            texts[f"ours/{run.name}"] = rows
    if not recorded or len(texts) == len(recorded):
        raise PeerOutputError(f"nothing to compare: {len(recorded)} recorded peer trials in {run_dir}, "
                              f"{len(texts) - len(recorded)} of our runs with harmful completions in "
                              f"{', '.join(map(str, ours_dirs))}")
    return texts, recorded


def tally(labels: Mapping[str, Sequence[bool]], recorded: Mapping[str, int], peer: str) -> dict:
    """Refusals per trial by the peer's rule, keyed as the study's runs are (``<peer>_trial_NNN`` for the peer's
    trial of Optuna number NNN, ``unsteered`` for its baseline; our run folders' names), after checking that the rule
    recounts every recorded trial of the peer to what the peer counted."""
    wrong = {name: (recorded[name], sum(labels[name])) for name in recorded if sum(labels[name]) != recorded[name]}
    if wrong:
        raise PeerOutputError(f"{peer}'s rule, run again on its own recorded completions, does not give its counts "
                              f"(trial: counted, recounted): {wrong}; this is not the rule the search optimised")
    out: dict = {"peer": {}, "ours": {}}
    for name, lab in labels.items():
        side, key = name.split("/", 1)
        run = key if side == "ours" else ("unsteered" if key == "0" else f"{peer}_trial_{int(key) - 1:03d}")
        out[side][run] = {"refusals": int(sum(lab)), "n": len(lab)}
    return out


def our_search_dirs(model: str) -> list[Path]:
    """The study's search folders for ``model`` that exist: the pareto step's INLP-flip search (with the reference
    runs) and its heretic-kernel search."""
    return [d for name in ("pareto", "pareto_weighted") if (d := HERE.parents[1] / "study" / model / name).is_dir()]


def count(run_dir: Path, ours_dirs: Sequence[Path]) -> Path:
    """Run the peer's rule over both searches' completions and write ``peer_count.json`` (atomic)."""
    peer = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["peer"]
    python = installed_python(peer)
    texts, recorded = texts_to_judge(run_dir, ours_dirs)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "texts.json", Path(tmp) / "labels.json"
        src.write_text(json.dumps(texts), encoding="utf-8")
        done = subprocess.run([str(python), str(HERE / f"{peer}_driver.py"), "--judge", str(src), str(dst)], cwd=run_dir,
                              env=peer_env(run_dir), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PeerOutputError(f"{peer}'s rule failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        labels = json.loads(dst.read_text(encoding="utf-8"))
    result = {"peer": peer, "rule": f"{peer}_driver.py --judge: {peer}'s own refusal rule, the run's settings.json",
              "ours_dirs": [os.path.relpath(d, run_dir) for d in ours_dirs], **tally(labels, recorded, peer)}
    atomic_write_json(run_dir / COUNTS, result)
    return run_dir / COUNTS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ours", type=Path, nargs="+", help="our search folders (default: study/<the run's model>/pareto "
                        "and pareto_weighted, those that exist)")
    args = parser.parse_args(argv)
    try:
        model = json.loads((args.run_dir / "manifest.json").read_text(encoding="utf-8"))["model"]
        path = count(args.run_dir, args.ours or our_search_dirs(model))
    except (PeerInputError, PeerOutputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
