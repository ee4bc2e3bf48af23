"""Refusal judges: the abstract base, the registry, the built-ins and their agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from refusal.errors import ConfigError
from refusal.judges.agreement import agreement
from refusal.judges.base import LABELS, Judge, Judgement
from refusal.judges.registry import JUDGES, available_judges, get_judge

__all__ = ["JUDGES", "LABELS", "Judge", "Judgement", "agreement", "available_judges", "build_judges",
           "get_judge", "judge_configs"]


def judge_configs(cfg: DictConfig, plugin_dirs: list[str | Path]) -> dict[str, dict[str, Any]]:
    """``eval.judges`` resolved: label -> judge config (with ``type``), each checked; no model loads."""
    names = list(cfg.eval.get("judges") or ["substring"])
    defined = OmegaConf.to_container(cfg.get("judge") or {}, resolve=True)
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.judges={names} lists a judge twice")
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
