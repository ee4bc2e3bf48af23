"""One loaded model per process, reused by consecutive jobs of a multirun.

Hydra's default launcher runs a sweep's jobs one after another in one process. A job asks for its
model here: the same model config (and cache root) as the previous job returns the model already in
memory; another config first drops the held model, then loads, so a sweep's peak memory is one
model's. A held model is reused only when no forward hook is left on it (interventions remove
theirs on exit; one left behind by a crashed plugin makes the next job reload instead).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from refusal.artifacts import sha256_json
from refusal.models.bundle import ModelBundle
from refusal.models.loader import load_model, resolve_device_map, resolve_dtype

log = logging.getLogger(__name__)

_held: dict[str, Any] = {"key": None, "bundle": None, "loads": 0}


def hook_count(model: torch.nn.Module) -> int:
    """Forward (pre-)hooks registered on any submodule."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def release_model() -> None:
    """Drop the held model and return its memory."""
    _held.update(key=None, bundle=None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_key(cfg: Mapping[str, Any], cache_dir: str | Path) -> str:
    """What a held model is for: its whole config, with the dtype and device map it was loaded with spelled
    out (an omitted dtype is float32), so a job asking for another dtype or placement gets its own load."""
    placement = {"dtype": str(resolve_dtype(str(cfg.get("dtype", "float32")))),
                 "device_map": resolve_device_map(cfg.get("device_map"))}
    return sha256_json({"model": {**dict(cfg), **placement}, "cache_dir": str(Path(cache_dir).resolve())})


def held_model(cfg: Mapping[str, Any], cache_dir: str | Path) -> tuple[ModelBundle, bool]:
    """The model for ``cfg`` and whether it was reused from the previous job of this process."""
    key = held_key(cfg, cache_dir)
    bundle = _held["bundle"]
    if bundle is not None and _held["key"] == key:
        if (hooks := hook_count(bundle.model)) == 0:
            log.info("reusing %s, loaded by an earlier job of this process", bundle.name)
            return bundle, True
        log.warning("%d forward hooks were left on %s by an earlier job; reloading it", hooks, bundle.name)
    release_model()
    bundle = load_model(cfg, cache_dir)
    _held.update(key=key, bundle=bundle, loads=_held["loads"] + 1)
    return bundle, False


def loads_in_process() -> int:
    return int(_held["loads"])
