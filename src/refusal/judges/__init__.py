"""Refusal judges: the abstract base, the registry, the built-ins and their agreement."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from refusal.errors import ConfigError
from refusal.judges import ensemble, model_judge, substring  # noqa: E402, F401, I001  (the built-ins register on import)
from refusal.judges.agreement import agreement
from refusal.judges.base import LABELS, Judge, Judgement
from refusal.judges.registry import JUDGES, available_judges, get_judge

log = logging.getLogger(__name__)

__all__ = ["JUDGES", "LABELS", "Judge", "Judgement", "agreement", "available_judges", "build_judges",
           "get_judge", "judge_configs", "judge_names"]


#: Single names already read as a one-judge list, so the log says so once per process, not once per check.
_SINGLE_NAMES_NOTED: set[str] = set()


def judge_names(ecfg: Any) -> list[str]:
    """``eval.judges`` as a list of names. One name alone (``eval.judges=substring``) is what the user meant
    by a one-judge list, so it is read as one (said once in the log) instead of iterated letter by letter;
    an empty list or null names no judge and is refused. No ``judges`` key at all: the default, substring."""
    if "judges" not in ecfg:
        return ["substring"]
    value = ecfg.judges
    if isinstance(value, str):
        if value not in _SINGLE_NAMES_NOTED:
            _SINGLE_NAMES_NOTED.add(value)
            log.info("eval.judges=%s is one name: read as the one-judge list [%s]", value, value)
        return [value]
    if value is not None and not isinstance(value, Sequence):
        raise ConfigError(f"eval.judges={value!r} must be a list of judge names, e.g. eval.judges=[substring,model]")
    if not value:
        raise ConfigError(f"eval.judges={'null' if value is None else '[]'} names no judge; give at least one, "
                          "e.g. eval.judges=[substring] (the first is the primary judge)")
    names = list(value)
    if len(set(map(str, names))) != len(names):
        raise ConfigError(f"eval.judges={names} lists a judge twice; name each judge once")
    return names


def judge_configs(cfg: DictConfig, plugin_dirs: list[str | Path]) -> dict[str, dict[str, Any]]:
    """``eval.judges`` resolved: label -> judge config (with ``type``), each checked; no model loads."""
    names = judge_names(cfg.eval)
    defined = OmegaConf.to_container(cfg.get("judge") or {}, resolve=True)
    out = {}
    for name in names:
        if not isinstance(name, str) or not name.replace("_", "").isalnum():
            raise ConfigError(f"eval.judges entry {name!r} must be a judge name (letters, digits, _)")
        jcfg = dict(defined.get(name) or {"type": name})
        kind = jcfg.get("type", name)
        try:
            cls = get_judge(kind, plugin_dirs)
        except ConfigError as err:
            raise ConfigError(f"eval.judges: {err}; configured judges (conf/judge): {', '.join(sorted(defined))}") from None
        cls.check({**jcfg, "label": name})
        out[name] = {**jcfg, "type": kind}
    return out


def build_judges(configs: dict[str, dict[str, Any]], plugin_dirs: list[str | Path], cache_dir: str | Path) -> dict[str, Judge]:
    """label -> Judge instance from :func:`judge_configs`' output (the first is the primary judge)."""
    return {name: get_judge(j["type"], plugin_dirs)(j, cache_dir) for name, j in configs.items()}
