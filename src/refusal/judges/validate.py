"""``python -m refusal judges --validate FILE``: every chosen judge scored against human labels.

The judges are the ones ``conf/judge`` defines (composed with Hydra as evaluate.py would, so an override
such as ``judge.model.model=qwen05`` applies); by default the cheap ones, those whose class loads no model
(substring, heretic). A model judge runs only when named (``--judges substring,heretic,model``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from refusal.errors import ConfigError, DataError
from refusal.judges import build_judges, get_judge, judge_configs
from refusal.judges.accuracy import judge_accuracy
from refusal.judges.labelled import GOLD_LABELS, read_labelled
from refusal.paths import conf_dir


def _config(names: Sequence[str] | None, overrides: Sequence[str], plugin_dirs: list[str | Path]):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        try:
            cfg = compose("config", overrides=list(overrides))
        except HydraException as err:
            raise ConfigError(f"{str(err).splitlines()[0]}; check the overrides") from err
    if names is None:  # the configured judges that load no model
        defined = OmegaConf.to_container(cfg.get("judge") or {}, resolve=True)
        names = [n for n, j in defined.items() if not get_judge(j.get("type", n), plugin_dirs).loads_model]
    cfg.eval.judges = list(names)
    return cfg


def validate(path: str | Path, names: Sequence[str] | None = None, *, split: str | None = None,
             overrides: Sequence[str] = (), plugin_dirs: list[str | Path]) -> dict[str, Any]:
    """Accuracy of each judge on the file's rows (``split``: dev or test rows only)."""
    rows = read_labelled(path)
    if split is not None:
        rows = [r for r in rows if r.split == split]
        if not rows:
            raise DataError(f"{path} has no rows with split={split}; label some rows {split}, or leave --split out")
    cfg = _config(names, overrides, plugin_dirs)
    judges = build_judges(judge_configs(cfg, plugin_dirs), plugin_dirs, cfg.cache_dir)
    prompts, completions = [r.prompt for r in rows], [r.completion for r in rows]
    gold = [r.label for r in rows]
    counts = Counter(gold)
    return {
        "file": str(path), "split": split or "all", "n": len(rows),
        "gold": {label: counts.get(label, 0) for label in GOLD_LABELS},
        "answers_prompt_false": sum(r.answers_prompt is False for r in rows),
        "judges": {name: judge_accuracy(gold, [j.label for j in judge.judge(prompts, completions)])
                   for name, judge in judges.items()},
    }
