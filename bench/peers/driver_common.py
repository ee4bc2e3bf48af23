"""What both peer drivers do the same way: record completions per trial, name trials, export the study, apply
the peer's own refusal rule to given texts (``--judge``, for ``peer_count.py``), and their command line (``run``).

Imported only by ``heretic_driver.py`` and ``abliterix_driver.py``, with a peer's own interpreter (the
script's folder is on its ``sys.path``); it needs nothing but the standard library and the peer's Optuna.

Records are keyed by the running trial's **Optuna number + 1** (0 is the unsteered baseline). A peer's own
``index`` attribute is not a key: after a resume both peers restart their counter (heretic at the number of
trials in the journal, abliterix at the number of *complete* ones), so an index can name two trials of one
study; the Optuna number cannot. In one uninterrupted run the two are the same (index = number + 1).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import optuna

RECORD = Path("completions.jsonl")
STATE = {"trial": 0}  # 0 while the unsteered baseline is judged, then the running trial's Optuna number + 1

_set_user_attr = optuna.trial.Trial.set_user_attr


def append(entry: dict) -> None:
    """One recorded entry (a trial's completions or its KL), with the trial it belongs to."""
    with RECORD.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"trial": STATE["trial"], **entry}, ensure_ascii=False) + "\n")


def set_user_attr(self: optuna.trial.Trial, key: str, value) -> None:
    """Both peers set ``index`` first thing in every trial: from then on the records belong to this trial."""
    if key == "index":
        STATE["trial"] = self.number + 1
    _set_user_attr(self, key, value)


def name_trials() -> None:
    optuna.trial.Trial.set_user_attr = set_user_attr


def export(study_name: str) -> None:
    """The Optuna journal's trials to ``trials.json`` and the peer's effective settings to ``settings.json``."""
    from optuna.storages import JournalStorage  # Optuna >= 3.1 (the peers'; the project's venv has 2.10)
    from optuna.storages.journal import JournalFileBackend

    journals = sorted(Path("checkpoints").glob("*.jsonl"))
    if len(journals) != 1:
        print(f"[bench/peers] expected one Optuna journal in checkpoints/, found {journals}", file=sys.stderr)
        return
    study = optuna.load_study(study_name=study_name, storage=JournalStorage(JournalFileBackend(str(journals[0]))))
    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "values": t.values,
               "user_attrs": t.user_attrs,
               "duration_s": t.duration.total_seconds() if t.duration is not None else None}
              for t in study.trials]
    Path("trials.json").write_text(json.dumps({"peer": study_name, "trials": trials}, indent=1, default=str) + "\n")
    Path("settings.json").write_text(json.dumps(json.loads(study.user_attrs["settings"]), indent=1) + "\n")


def judge_files(refused: Callable[[str], bool], texts_path: str, labels_path: str) -> None:
    """``--judge IN OUT``: the peer's own refusal rule on every text of IN (``{name: [text, ...]}``), the labels to
    OUT (``{name: [bool, ...]}``); the rule's settings are the run folder's ``settings.json`` (the peer's own)."""
    texts = json.loads(Path(texts_path).read_text(encoding="utf-8"))
    Path(labels_path).write_text(json.dumps({name: [bool(refused(t)) for t in batch] for name, batch in texts.items()}))


def run(peer: str, own_rule: Callable[[], Callable[[str], bool]], patch: Callable[[], None],
        peer_main: Callable[[], object]) -> int:
    """A driver's command line: ``--judge IN OUT`` (the peer's rule only), ``--export`` (after a crash or a hard
    stop: the journal's trials only), or the search itself, patched, with settings from the peer's config file in
    the working directory only; its trials are exported however it ends."""
    if sys.argv[1:2] == ["--judge"]:
        judge_files(own_rule(), *sys.argv[2:4])
        return 0
    if sys.argv[1:] == ["--export"]:
        export(peer)
        return 0
    name_trials()
    patch()
    sys.argv = [peer]
    try:
        peer_main()
    finally:
        export(peer)
    return 0
