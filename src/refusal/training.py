"""The body of ``train.py``: fit every artifact for the configured model, data and layer."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning
from omegaconf import DictConfig

from refusal.pipeline import fit, prepare, summary

log = logging.getLogger(__name__)


def run_training(cfg: DictConfig, needs: set[str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    lightning.seed_everything(int(cfg.seed), verbose=False)
    ctx = prepare(cfg)
    fitted = fit(ctx, needs)
    out = dict(summary(ctx, fitted))
    out["timings"] = {**ctx.timings, "total": time.perf_counter() - t0}
    out["artifact_dir"] = str(ctx.artifact_dir)
    return out
