"""Run abliterix 1.12.2 in batch mode in the current folder and record what it generated.

Runs with abliterix's own interpreter (bench/peers/.venv-abliterix), never imported by the project.
abliterix's batch mode (``non_interactive = true`` in ./abliterix.toml) needs no menu answers. This
driver changes nothing in its method; it only (1) records every harmful-prompt completion its
keyword detector judges, with the trial it belongs to, to ``completions.jsonl``; (2) skips its
automatic response-prefix search, so that, as for heretic (``response_prefix = ""``), completions start
right after the chat prompt (abliterix has no setting for this); (3) exports the Optuna study to
``trials.json`` and its effective settings to ``settings.json``. ``--judge IN OUT`` applies its keyword detector
(markers and degenerate-output rule, with the run's ``settings.json``) to given texts instead (``peer_count.py``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import abliterix.cli as abliterix_cli
from abliterix.eval.detector import RefusalDetector
from abliterix.eval.scorer import TrialScorer
from abliterix.settings import DetectionConfig
from driver_common import append, run

_evaluate_keyword_result = RefusalDetector._evaluate_keyword_result
_measure = TrialScorer.measure_kl_and_coherence


def evaluate_keyword_result(self: RefusalDetector, engine, target_msgs):
    """Its two-pass keyword detection, with the completions each prompt was finally judged on."""
    calls: list = []
    generate = RefusalDetector._gen

    def capture(engine, messages, **kwargs):
        responses = generate(engine, messages, **kwargs)
        calls.append((messages, list(responses)))
        return responses

    self._gen = capture  # an instance attribute: shadows the static method for this call
    try:
        result = _evaluate_keyword_result(self, engine, target_msgs)
    finally:
        del self._gen
    responses = list(calls[0][1])
    position = {id(m): i for i, m in enumerate(target_msgs)}
    for messages, again in calls[1:]:  # the second pass regenerates the short, undecided ones
        for message, response in zip(messages, again, strict=True):
            responses[position[id(message)]] = response
    append({"refusals": sum(label is True for label in result.labels), "prompts": [m.user for m in target_msgs],
            "responses": responses})
    return result


def measure_kl_and_coherence(self: TrialScorer, engine):
    """Called once per trial, before its refusals are counted (and before a trial is pruned for KL)."""
    start = time.perf_counter()
    kl, deviation = _measure(self, engine)
    append({"kl_divergence": kl, "length_deviation": deviation, "measure_s": time.perf_counter() - start})
    return kl, deviation


def no_response_prefix(engine, benign_msgs, target_msgs) -> None:
    engine.response_prefix = ""
    print("[bench/peers] response prefix search skipped: completions start after the chat prompt", flush=True)


def own_rule():
    """``RefusalDetector.detect_refusal`` as the run used it: its detection settings, no LLM judge (the run had none)."""
    detection = DetectionConfig(**json.loads(Path("settings.json").read_text(encoding="utf-8"))["detection"])
    if detection.llm_judge:
        raise SystemExit("[bench/peers] this run used abliterix's LLM judge; its keyword rule is not what it counted")
    detector = RefusalDetector.__new__(RefusalDetector)  # __init__ opens the LLM judge's cache, which is not used
    detector.config, detector._cache = SimpleNamespace(detection=detection), None
    return detector.detect_refusal


def patch() -> None:
    RefusalDetector._evaluate_keyword_result = evaluate_keyword_result
    TrialScorer.measure_kl_and_coherence = measure_kl_and_coherence
    abliterix_cli._detect_response_prefix = no_response_prefix


if __name__ == "__main__":
    sys.exit(run("abliterix", own_rule, patch, abliterix_cli.main))  # settings come from ./abliterix.toml only
