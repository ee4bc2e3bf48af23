"""Job-level resume for long sweeps (``resume=true``): a job whose folder already holds a finished run of the
same configuration is not run again, so a multirun interrupted after some of its jobs picks up at the first
unfinished one (the study's sweeps outlast a session on 2 CPU cores)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from refusal.run_files import completions_path

# Where things go and how they are shown, not what is measured: left out of the fingerprint.
NOT_MEASURED = ("artifacts_dir", "cache_dir", "plugin_dirs", "progress", "logger", "resume")


def config_fingerprint(cfg: DictConfig) -> str:
    """SHA-256 of the resolved configuration minus :data:`NOT_MEASURED` and minus null values, so a key added
    later with a null default ("not set": the behaviour before the key existed) leaves the jobs already finished
    resumable. The code's version is not in it: a resumed sweep keeps jobs that earlier code ran (as the study's
    step stamps do); delete a job's folder to redo it."""
    # only the measured keys are resolved: the others may need a running Hydra (the W&B logger's dir is
    # ${hydra:runtime.output_dir}), and a config composed in a notebook has none
    measured = {key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node := cfg[key]) else node
                for key in cfg if key not in NOT_MEASURED}
    return hashlib.sha256(json.dumps(_set_only(measured), sort_keys=True, default=str).encode()).hexdigest()


def _set_only(value: Any) -> Any:
    """``value`` with every null-valued mapping key left out, at any depth (list items stay where they are)."""
    if isinstance(value, dict):
        return {k: _set_only(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_set_only(v) for v in value]
    return value


def finished_run(output_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The results of a finished run of this configuration in ``output_dir``, else None (absent, failed,
    unreadable, made by another configuration, or its completions missing)."""
    path = output_dir / "results.json"
    if not path.exists() or completions_path(output_dir) is None:
        return None
    try:
        results = json.loads(path.read_text())
    except ValueError:
        return None
    ok = results.get("status") == "ok" and results.get("config_sha256") == fingerprint
    return results if ok else None
