"""``python -m refusal judges --validate FILE``: every chosen judge scored against human labels.

The judges are the ones ``conf/judge`` defines (composed with Hydra as evaluate.py would, so an override
such as ``judge.model.model=qwen05`` applies); by default the cheap ones, those whose class loads no model
(substring, heretic). A model judge runs only when named (``--judges substring,heretic,model``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from refusal.artifacts import shown_path
from refusal.errors import ConfigError, DataError
from refusal.judges import build_judges, get_judge, judge_configs
from refusal.judges.accuracy import judge_accuracy
from refusal.judges.labelled import GOLD_LABELS, read_labelled
from refusal.paths import conf_dir
from refusal.schema import compose


def compose_overrides(overrides: Sequence[str]):
    """The project's config with ``overrides``; a bad override is one ConfigError naming it."""
    try:
        return compose(conf_dir(), list(overrides))
    except HydraException as err:
        raise ConfigError(f"{str(err).splitlines()[0]}; check the overrides") from err


def _config(names: Sequence[str] | None, overrides: Sequence[str], plugin_dirs: list[str | Path]):
    cfg = compose_overrides(overrides)
    if names is None:  # the configured judges that load no model
        defined = OmegaConf.to_container(cfg.get("judge") or {}, resolve=True)
        names = [n for n, j in defined.items() if not get_judge(j.get("type", n), plugin_dirs).loads_model]
    cfg.eval.judges = list(names)
    return cfg


def best_threshold(scores: Sequence[float], refused: Sequence[bool]) -> tuple[float, float]:
    """The score threshold (label refusal when score >= it) with the highest accuracy on labelled rows, and
    that accuracy. Candidates: midpoints between consecutive distinct scores and one beyond each end; among
    equally accurate ones the one nearest 0, the judge's own boundary for log-odds, so a calibration moves it
    no further than the labels ask."""
    if not scores:
        raise DataError("no labelled rows to calibrate a threshold on; label some rows dev")
    values = sorted(set(map(float, scores)))
    candidates = [values[0] - 1.0, *((a + b) / 2 for a, b in itertools.pairwise(values)), values[-1] + 1.0]
    truth = torch.tensor(list(refused), dtype=torch.bool)
    score = torch.tensor(list(scores), dtype=torch.float64)
    accuracy = [float(((score >= t) == truth).double().mean()) for t in candidates]
    best = max(accuracy)
    return min((t for t, a in zip(candidates, accuracy, strict=True) if a == best), key=abs), best


def rows_of_split(rows: Sequence[Any], split: str, path: str | Path) -> list[Any]:
    """The labelled rows of one split (dev or test), or an error naming the fix."""
    kept = [r for r in rows if r.split == split]
    if not kept:
        raise DataError(f"{path} has no rows with split={split}; label some rows {split}, or leave --split out")
    return kept


def validate(path: str | Path, names: Sequence[str] | None = None, *, split: str | None = None,
             overrides: Sequence[str] = (), plugin_dirs: list[str | Path], calibrate: bool = False) -> dict[str, Any]:
    """Accuracy of each judge on the file's rows (``split``: dev or test rows only). ``calibrate``: each judge's
    score threshold is chosen on the dev rows (:func:`best_threshold`) and the judges are scored on the test rows
    with it, so the reported accuracy is of a rule fixed before the rows it is scored on."""
    rows = read_labelled(path)
    if calibrate:
        if split is not None:
            raise ConfigError("--calibrate chooses thresholds on dev and scores test; leave --split out")
        dev = [r for r in rows if r.split == "dev"]
        rows = [r for r in rows if r.split == "test"]
        if not dev or not rows:
            raise DataError(f"{path}: --calibrate needs rows of both splits (dev {len(dev)}, test {len(rows)}); "
                            "give each row split=dev or split=test")
    elif split is not None:
        rows = rows_of_split(rows, split, path)
    cfg = _config(names, overrides, plugin_dirs)
    judges = build_judges(judge_configs(cfg, plugin_dirs), plugin_dirs, cfg.cache_dir)
    prompts, completions = [r.prompt for r in rows], [r.completion for r in rows]
    gold = [r.label for r in rows]
    counts = Counter(gold)
    labels, calibration = {}, {}
    for name, judge in judges.items():
        verdicts = judge.judge(prompts, completions)
        labels[name] = [j.label for j in verdicts]
        if calibrate:
            dev_scores = [j.score for j in judge.judge([r.prompt for r in dev], [r.completion for r in dev])]
            threshold, dev_accuracy = best_threshold(dev_scores, [r.label != "compliance" for r in dev])
            labels[name] = ["refusal" if j.score >= threshold else "compliance" for j in verdicts]
            calibration[name] = {"threshold": threshold, "dev_accuracy": dev_accuracy, "dev_n": len(dev)}
    return {
        "file": shown_path(path), "split": "test, thresholds from dev" if calibrate else split or "all", "n": len(rows),
        "gold": {label: counts.get(label, 0) for label in GOLD_LABELS},
        "answers_prompt_false": sum(r.answers_prompt is False for r in rows),
        "judges": {name: judge_accuracy(gold, predicted) for name, predicted in labels.items()},
        **({"calibration": calibration} if calibrate else {}),
    }
