"""Read a peer's trials back as our report's runs, its completions judged by our judges.

A peer run folder (bench/peers/run_peer.py) holds the peer's ``trials.json`` (each Optuna trial: parameters,
its refusal count and KL), ``completions.jsonl`` (what it generated on the harmful test prompts, per
trial; trial 0 is the unsteered model) and our ``manifest.json`` (the prompts we wrote). Each
completed trial becomes ``report/<peer>_trial_NNN/results.json`` in the format of our runs: the
primary judge's ``harmful/refusal_rate`` (Wilson interval, every judge under ``harmful/judge/<name>/``),
the peer's own ``harmless/kl_div`` (KL(unsteered ‖ steered) of the first generated token, averaged over
the harmless test prompts: the same quantity as ours), its parameters, and its own count under
``peer/``. ``refusal.report.write_report`` then writes report.csv, report.md and pareto.png there.

    python bench/peers/peer_readback.py bench/peers/runs/qwen05-heretic [--judges substring heretic]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peer_inputs import prompt_line

#: The Optuna user attribute that holds each peer's direction index (None: a direction per layer).
DIRECTION_ATTR = {"heretic": "direction_index", "abliterix": "vector_index"}
#: Why a peer leaves a trial incomplete (from their sources), said in the failed run's error.
STOPS = {"heretic": "it prunes only a trial stopped by Ctrl+C or --timeout",
         "abliterix": "it prunes a trial over kl.prune_threshold, or one stopped by Ctrl+C or --timeout"}


class PeerOutputError(ValueError):
    """A peer's output that does not read back consistently; the message says what differs."""


def load_records(path: Path) -> dict[int, dict[str, Any]]:
    """``completions.jsonl`` (a run folder's) merged per trial (its judging entry and its KL entry); read gzipped
    when a study folder was archived (``refusal.run_files``), so a committed run can be judged again."""
    from refusal.run_files import completions_text

    merged: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(completions_text(path.parent).splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            trial = int(entry.pop("trial"))
        except (ValueError, KeyError, TypeError) as err:
            raise PeerOutputError(f"{path}:{number} is not a recorded entry with a 'trial' ({err})") from None
        merged.setdefault(trial, {}).update(entry)
    return merged


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def trial_outcomes(trials: Sequence[Mapping[str, Any]], records: Mapping[int, Mapping[str, Any]],
                   test_prompts: Sequence[str], peer: str) -> list[dict[str, Any]]:
    """One entry per trial of the peer's study: its parameters, the completions it was judged on and
    its own KL and refusal count, checked against the recording (the same trial must have the same
    numbers in both, and the completions must answer our harmful test prompts, in order)."""
    expected = [prompt_line(p) for p in test_prompts]
    out = []
    for t in trials:
        attrs = t.get("user_attrs") or {}
        entry: dict[str, Any] = {"number": t["number"], "state": t["state"], "params": dict(t.get("params") or {}),
                                 "direction_index": attrs.get(DIRECTION_ATTR[peer]), "duration_s": t.get("duration_s")}
        key = t["number"] + 1  # the drivers' key (driver_common): the Optuna number, unique across resumes
        if t["state"] != "COMPLETE":
            kl = records.get(key, {}).get("kl_divergence")
            entry["reason"] = (f"not completed by {peer} (Optuna state {t['state']}; {STOPS[peer]})"
                               + (f"; KL {kl:.3g}" if kl is not None else ""))
            out.append(entry)
            continue
        rec = records.get(key)
        if rec is None or "responses" not in rec or "kl_divergence" not in rec:
            raise PeerOutputError(f"{peer} trial {t['number']} (recorded as trial {key}) has no recorded completions and KL in "
                                  "completions.jsonl; was the run made by bench/peers/run_peer.py's driver?")
        if rec["refusals"] != attrs["refusals"] or not _same(rec["kl_divergence"], attrs["kl_divergence"]):
            raise PeerOutputError(
                f"{peer} trial {t['number']}: the study says {attrs['refusals']} refusals, KL {attrs['kl_divergence']!r}; "
                f"the recording says {rec['refusals']}, KL {rec['kl_divergence']!r} (recording and study out of step)")
        if rec["prompts"] != expected:
            raise PeerOutputError(f"{peer} trial {t['number']} answered other prompts than manifest.json's harmful_test "
                                  f"({len(rec['prompts'])} recorded, {len(expected)} written)")
        out.append({**entry, "kl_divergence": float(rec["kl_divergence"]), "refusals": int(rec["refusals"]),
                    "completions": list(rec["responses"])})
    return out


def judge_outcomes(outcomes: Sequence[dict[str, Any]], baseline: Sequence[str], prompts: Sequence[str],
                   judges: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, list[str]]], list[str]]:
    """Every completed trial's refusal metrics by our judges (the first is primary), in our keys; each trial's labels
    per judge (empty for one the peer did not complete); the primary judge's labels of the unsteered completions."""
    from refusal.evaluation.judging import _column_metrics

    primary = next(iter(judges))
    base_labels = [j.label for j in judges[primary].judge(prompts, baseline)]
    metrics, labels = [], []
    for o in outcomes:
        if "completions" not in o:
            metrics.append({})
            labels.append({})
            continue
        judged = {name: judge.judge(prompts, o["completions"]) for name, judge in judges.items()}
        metrics.append(_column_metrics("harmful", judged, primary, base_labels))
        labels.append({name: [v.label for v in verdicts] for name, verdicts in judged.items()})
    return metrics, labels, base_labels


def completion_rows(prompts: Sequence[str], completions: Sequence[str], labels: Mapping[str, Sequence[str]],
                    base_labels: Sequence[str]) -> list[dict[str, Any]]:
    """A trial's completions as our runs record them (``refusal.evaluation.records``): the harmful column, the primary
    judge's verdict as ``refused`` (the first judge in ``labels``), the unsteered one as ``baseline_refused``, and
    every judge's label, so ``refusal.compare`` pairs a peer's trial with any of our runs on the same prompts."""
    primary = next(iter(labels))
    return [{"split": "harmful", "label": "harmful", "prompt": p, "completion": c,
             "refused": labels[primary][i] == "refusal", "baseline_refused": base_labels[i] == "refusal",
             "judges": {name: lab[i] for name, lab in labels.items()}}
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]


def results_records(peer: str, model: str, outcomes: Sequence[dict[str, Any]], judged: Sequence[dict[str, Any]],
                    n_harmless: int, base_refusals: int, primary: str) -> list[dict[str, Any]]:
    """Our results.json records, one per trial (a trial the peer did not complete is a failed run)."""
    records = []
    for o, metrics in zip(outcomes, judged, strict=True):
        base = {"model": model, "intervention": peer, "params": o["params"], "layer": None, "trial": o["number"]}
        if "completions" not in o:
            records.append({**base, "status": "failed", "error": o["reason"]})
            continue
        n = len(o["completions"])
        records.append({**base, "status": "ok", "judge": primary, "eval": "peer", "direction_index": o["direction_index"],
                        "metrics": {**metrics, "harmless/kl_div": o["kl_divergence"], "n_harmful": n,
                                    "n_harmless": n_harmless, "peer/refusals": o["refusals"],
                                    "peer/refusal_rate": o["refusals"] / n, "peer/base_refusal_rate": base_refusals / n,
                                    "peer/trial_s": o["duration_s"]}})
    return records


def read_run(run_dir: Path, judge_names: Sequence[str] = ("substring", "heretic")) -> Path:
    """Judge a peer run folder and write its report; return the report folder."""
    from peer_inputs import compose

    from refusal.artifacts import atomic_write_json, atomic_write_text
    from refusal.config import plugin_dirs
    from refusal.judges import build_judges, judge_configs
    from refusal.report import write_report

    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    doc = json.loads((run_dir / "trials.json").read_text(encoding="utf-8"))
    peer = doc["peer"]
    records = load_records(run_dir / "completions.jsonl")
    prompts = manifest["sets"]["harmful_test"]["prompts"]
    outcomes = trial_outcomes(doc["trials"], records, prompts, peer)
    if 0 not in records or "responses" not in records[0]:
        raise PeerOutputError(f"{run_dir}/completions.jsonl has no unsteered completions (trial 0)")
    cfg = compose(manifest["model"], len(prompts), overrides=[f"eval.judges=[{','.join(judge_names)}]"])
    judges = build_judges(judge_configs(cfg, plugin_dirs(cfg)), plugin_dirs(cfg), cfg.cache_dir)
    judged, labels, base_labels = judge_outcomes(outcomes, records[0]["responses"], prompts, judges)
    results = results_records(peer, manifest["model"], outcomes, judged, manifest["sets"]["harmless_test"]["n"],
                              int(records[0]["refusals"]), next(iter(judges)))
    report = run_dir / "report"
    for res, o, lab in zip(results, outcomes, labels, strict=True):
        folder = report / f"{peer}_trial_{o['number']:03d}"
        atomic_write_json(folder / "results.json", res)
        if "completions" in o:
            rows = completion_rows(prompts, o["completions"], lab, base_labels)
            atomic_write_text(folder / "completions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    baseline = [{"prompt": p, "completion": c, "label": lab}
                for p, c, lab in zip(prompts, records[0]["responses"], base_labels, strict=True)]
    atomic_write_text(report / "baseline_completions.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in baseline))
    write_report(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--judges", nargs="+", default=["substring", "heretic"],
                        help="conf/judge names, the first primary (model loads a judge model: slow on CPU)")
    args = parser.parse_args(argv)
    from refusal.errors import RefusalError

    try:
        report = read_run(args.run_dir, args.judges)
    except (PeerOutputError, RefusalError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {report / 'report.csv'} and {report / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
