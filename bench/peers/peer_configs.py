"""The peers' configuration files, written from one set of comparison settings.

heretic reads ``config.toml`` and abliterix ``abliterix.toml`` from the working directory (pydantic
settings; key names from heretic 1.4.0's ``heretic/config.py`` and abliterix 1.12.2's
``abliterix/settings.py``). Only what the comparison fixes is set; every other setting is the peer's
default, so the method compared is the peer's own. :data:`QWEN_DEFAULT_SYSTEM` is the system prompt
Qwen's chat template inserts when none is given, which is what our runs (``system_prompt: null``) see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peer_inputs import FILE_NAME

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CONFIG_FILES = {"heretic": "config.toml", "abliterix": "abliterix.toml"}


@dataclass(frozen=True)
class Comparison:
    """What both peers and our Pareto search share: model, prompts, trials, budget, seed."""

    model_folder: str
    trials: int            # our pareto step's --pareto-trials
    startup_trials: int    # random trials before TPE (our sweeper's n_startup_trials, capped at trials)
    max_new_tokens: int    # the study's --max-new-tokens
    batch_size: int
    seed: int = 0
    # heretic always sends a system turn; with this text its chat prompt is ours token for token.
    # abliterix sends none when it is empty, so Qwen's template adds the same default.
    system_prompt: str = QWEN_DEFAULT_SYSTEM
    dtype: str = "float32"  # the dequantized weights' precision (ours: float32 weights)


def _prompt_file(stem: str) -> str:
    return f"prompts/{stem}/{FILE_NAME}"


def heretic_settings(c: Comparison) -> dict[str, Any]:
    """heretic's ``config.toml``: prompt files as datasets (it reads one prompt per line from a file
    path), ``response_prefix = ""`` (no automatic prefix search) and a fixed batch size."""
    return {
        "model": c.model_folder,
        "dtypes": [c.dtype],
        "batch_size": c.batch_size,
        "max_response_length": c.max_new_tokens,
        "response_prefix": "",
        "n_trials": c.trials,
        "n_startup_trials": min(c.startup_trials, c.trials),
        "seed": c.seed,
        "system_prompt": c.system_prompt,
        "study_checkpoint_dir": "checkpoints",
        "good_prompts": {"dataset": _prompt_file("harmless_fit")},
        "bad_prompts": {"dataset": _prompt_file("harmful_fit")},
        "good_evaluation_prompts": {"dataset": _prompt_file("harmless_test")},
        "bad_evaluation_prompts": {"dataset": _prompt_file("harmful_test")},
    }


def abliterix_settings(c: Comparison) -> dict[str, Any]:
    """abliterix's ``abliterix.toml``: batch mode (``non_interactive``), prompt folders read by
    ``datasets``' text builder (split "train", column "text"), no LLM judge (its default: offline)."""
    def source(stem: str) -> dict[str, str]:
        return {"dataset": f"prompts/{stem}", "split": "train", "column": "text"}

    return {
        "non_interactive": True,
        "seed": c.seed,
        "system_prompt": "" if c.system_prompt == QWEN_DEFAULT_SYSTEM else c.system_prompt,
        "model": {"model_id": c.model_folder, "dtype_fallback_order": [c.dtype]},
        "inference": {"batch_size": c.batch_size, "max_gen_tokens": c.max_new_tokens},
        "optimization": {"num_trials": c.trials, "num_warmup_trials": min(c.startup_trials, c.trials),
                         "sampler_seed": c.seed, "checkpoint_dir": "checkpoints"},
        "detection": {"llm_judge": False},
        "benign_prompts": source("harmless_fit"),
        "target_prompts": source("harmful_fit"),
        "benign_eval_prompts": source("harmless_test"),
        "target_eval_prompts": source("harmful_test"),
    }


SETTINGS = {"heretic": heretic_settings, "abliterix": abliterix_settings}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (same escapes)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML value")


def to_toml(settings: dict[str, Any], prefix: str = "") -> str:
    """``settings`` as TOML: plain keys first, then a ``[table]`` per nested mapping."""
    plain = [f"{k} = {_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    tables = [f"\n[{prefix}{k}]\n" + to_toml(v, f"{prefix}{k}.") for k, v in settings.items() if isinstance(v, dict)]
    return "\n".join(plain) + ("\n" if plain else "") + "".join(tables)


def write_config(peer: str, run_dir: Path, c: Comparison) -> Path:
    from refusal.artifacts import atomic_write_text

    path = run_dir / CONFIG_FILES[peer]
    atomic_write_text(path, f"# written by bench/peers/peer_configs.py for {peer}\n" + to_toml(SETTINGS[peer](c)))
    return path
