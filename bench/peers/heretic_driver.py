"""Run heretic 1.4.0 non-interactively in the current folder and record what it generated.

Runs with heretic's own interpreter (bench/peers/.venv-heretic), never imported by the project. It
changes nothing in heretic's method; it only (1) records every harmful-prompt completion heretic
judges, with the trial it belongs to, to ``completions.jsonl``; (2) answers heretic's closing menu
("Which trial do you want to use?") with "exit", since heretic has no batch mode; (3) exports the
Optuna study (each trial's parameters, refusal count and KL) to ``trials.json`` and heretic's
effective settings to ``settings.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import heretic.main as heretic_main
from heretic.evaluator import Evaluator

RECORD = Path("completions.jsonl")
STATE = {"trial": 0}  # 0 while the unsteered baseline is judged, then the trial's position in this run


def _append(entry: dict) -> None:
    with RECORD.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")


_count_refusals = Evaluator.count_refusals
_get_score = Evaluator.get_score


def count_refusals(self: Evaluator) -> int:
    seen: dict = {}
    generate = self.model.get_responses_batched

    def capture(prompts, **kwargs):
        responses = generate(prompts, **kwargs)
        seen.update(prompts=[p.user for p in prompts], responses=list(responses))
        return responses

    self.model.get_responses_batched = capture  # an instance attribute: shadows the method for this call
    try:
        refusals = _count_refusals(self)
    finally:
        del self.model.get_responses_batched
    _append({"trial": STATE["trial"], "refusals": refusals, **seen})
    return refusals


def get_score(self: Evaluator):
    STATE["trial"] += 1
    start = time.perf_counter()
    score, kl, refusals = _get_score(self)
    _append({"trial": STATE["trial"], "kl_divergence": kl, "refusals": refusals, "score": list(score),
             "evaluate_s": time.perf_counter() - start})
    return score, kl, refusals


def answer(message: str, choices):
    """heretic's menus: a fresh folder never meets the resume menu; the closing one is answered 'exit'."""
    print(f"[bench/peers] menu {message!r}: answered 'exit' (non-interactive run)", flush=True)
    return ""


def export() -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journals = sorted(Path("checkpoints").glob("*.jsonl"))
    if len(journals) != 1:
        print(f"[bench/peers] expected one Optuna journal in checkpoints/, found {journals}", file=sys.stderr)
        return
    study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(str(journals[0]))))
    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "values": t.values,
               "user_attrs": t.user_attrs,
               "duration_s": t.duration.total_seconds() if t.duration is not None else None}
              for t in study.trials]
    Path("trials.json").write_text(json.dumps({"peer": "heretic", "trials": trials}, indent=1) + "\n")
    Path("settings.json").write_text(json.dumps(json.loads(study.user_attrs["settings"]), indent=1) + "\n")


def main() -> int:
    if sys.argv[1:] == ["--export"]:  # after a crash or a hard stop: the journal's trials only
        export()
        return 0
    Evaluator.count_refusals = count_refusals
    Evaluator.get_score = get_score
    heretic_main.prompt_select = answer
    sys.argv = ["heretic"]  # settings come from ./config.toml only
    try:
        heretic_main.run()
    finally:
        export()
    return 0


if __name__ == "__main__":
    sys.exit(main())
