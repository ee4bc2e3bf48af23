"""What both peer drivers do the same way: record completions per trial, name trials, export the study, apply
the peer's own refusal rule to given texts (``--judge``, for ``peer_count.py``), and their command line (``run``).

Imported only by ``heretic_driver.py`` and ``abliterix_driver.py``, with a peer's own interpreter (the
script's folder is on its ``sys.path``); it needs nothing but the standard library and the peer's Optuna (and its numpy).

Records are keyed by the running trial's **Optuna number + 1** (0 is the unsteered baseline). A peer's own
``index`` attribute is not a key: after a resume both peers restart their counter (heretic at the number of
trials in the journal, abliterix at the number of *complete* ones), so an index can name two trials of one
study; the Optuna number cannot. In one uninterrupted run the two are the same (index = number + 1).

Both peers seed their TPE sampler, so a resumed process would draw its random start-up points from the seed again
and repeat earlier trials. ``keep_sampler_state`` saves the sampler's random states in ``checkpoints/`` as each trial
starts (and again when it completes) and puts them back in a resumed process, which then draws what the stopped one
would have drawn next.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
from optuna.samplers import TPESampler

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


def random_states(sampler: TPESampler) -> list[np.random.RandomState]:
    """The TPE sampler's own generator and its start-up random sampler's (Optuna 4 wraps each in a LazyRandomState,
    Optuna 2 does not)."""
    return [getattr(r, "rng", r) for r in (sampler._rng, sampler._random_sampler._rng)]


def sampler_state_path(study: optuna.Study) -> Path:
    return Path("checkpoints") / f"{study.study_name}.sampler-state.json"


def save_sampler_state(sampler: TPESampler, study: optuna.Study, trial: int, when: str) -> None:
    """The random states ``when`` (``before`` its first draw, ``after`` it completed) trial ``trial``, atomically."""
    states = [[name, keys.tolist(), pos, has_gauss, gauss]
              for name, keys, pos, has_gauss, gauss in (r.get_state() for r in random_states(sampler))]
    path = sampler_state_path(study)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"trial": trial, "when": when, "states": states}))
    os.replace(tmp, path)


def restore_sampler_state(sampler: TPESampler, study: optuna.Study, trial: int) -> None:
    """Before the first trial of a resumed process (number ``trial``): the states saved for the study's last trial,
    ``trial - 1``. Saved after it completed, the search goes on as if never stopped; saved before it (it was cut
    off), its unevaluated draws are drawn again, for this trial."""
    path = sampler_state_path(study)
    saved = json.loads(path.read_text()) if path.exists() else None
    if saved is None or saved["trial"] != trial - 1:
        found = "is missing" if saved is None else f"is for trial {saved['trial']}"
        print(f"[bench/peers] {path} {found}, not the study's last trial {trial - 1}: the resumed search draws from "
              "the sampler's seed again and may repeat earlier trials' parameters", flush=True)
        return
    for rng, (name, keys, pos, has_gauss, gauss) in zip(random_states(sampler), saved["states"], strict=True):
        rng.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    print(f"[bench/peers] resumed the sampler's random state from {saved['when']} trial {trial - 1}", flush=True)


_infer_relative_search_space = TPESampler.infer_relative_search_space
_after_trial = TPESampler.after_trial


def infer_relative_search_space(self: TPESampler, study: optuna.Study, trial):
    """The sampler's first call in every trial, before any of the trial's draws (in Optuna 2 and 4)."""
    if not getattr(self, "_resume_checked", False):
        self._resume_checked = True
        if trial.number > 0:
            restore_sampler_state(self, study, trial.number)
    save_sampler_state(self, study, trial.number, "before")
    return _infer_relative_search_space(self, study, trial)


def after_trial(self: TPESampler, study: optuna.Study, trial, state, values) -> None:
    _after_trial(self, study, trial, state, values)
    if state == optuna.trial.TrialState.COMPLETE:
        save_sampler_state(self, study, trial.number, "after")


def keep_sampler_state() -> None:
    TPESampler.infer_relative_search_space = infer_relative_search_space
    TPESampler.after_trial = after_trial


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
    keep_sampler_state()
    patch()
    sys.argv = [peer]
    try:
        peer_main()
    finally:
        export(peer)
    return 0
