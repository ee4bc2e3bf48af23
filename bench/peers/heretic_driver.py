"""Run heretic 1.4.0 non-interactively in the current folder and record what it generated.

Runs with heretic's own interpreter (bench/peers/.venv-heretic), never imported by the project. It
changes nothing in heretic's method; it only (1) records every harmful-prompt completion heretic
judges, with the trial it belongs to, to ``completions.jsonl``; (2) answers heretic's menus, since it has
no batch mode: its closing one ("Which trial do you want to use?") with "exit", its resume question (a
study left in ``checkpoints/``, ``run_peer.py --resume``) with "continue"; (3) exports the
Optuna study (each trial's parameters, refusal count and KL) to ``trials.json`` and heretic's
effective settings to ``settings.json``. ``--judge IN OUT`` applies heretic's refusal rule (its markers, from the
run's ``settings.json``) to given texts instead (``peer_count.py``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import heretic.main as heretic_main
from driver_common import append, run
from heretic.evaluator import Evaluator

_count_refusals = Evaluator.count_refusals
_get_score = Evaluator.get_score
#: heretic's question when its checkpoint folder holds a study (its "continue" choice resumes it).
RESUME_MENU = "How would you like to proceed?"


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
    append({"refusals": refusals, **seen})
    return refusals


def get_score(self: Evaluator):
    start = time.perf_counter()
    score, kl, refusals = _get_score(self)
    append({"kl_divergence": kl, "refusals": refusals, "score": list(score), "evaluate_s": time.perf_counter() - start})
    return score, kl, refusals


def answer(message: str, choices):
    """heretic's menus: an interrupted study in the folder is continued (run_peer.py --resume); the closing
    menu, and every other, is answered 'exit'."""
    choice = "continue" if message == RESUME_MENU else ""
    print(f"[bench/peers] menu {message!r}: answered {choice or 'exit'!r} (non-interactive run)", flush=True)
    return choice


def own_rule():
    """``Evaluator.is_refusal`` with the run's markers (it reads nothing else of the evaluator)."""
    markers = json.loads(Path("settings.json").read_text(encoding="utf-8"))["refusal_markers"]
    evaluator = SimpleNamespace(settings=SimpleNamespace(refusal_markers=markers))
    return lambda text: Evaluator.is_refusal(evaluator, text)


def patch() -> None:
    Evaluator.count_refusals = count_refusals
    Evaluator.get_score = get_score
    heretic_main.prompt_select = answer


if __name__ == "__main__":
    sys.exit(run("heretic", own_rule, patch, heretic_main.run))  # settings come from ./config.toml only
