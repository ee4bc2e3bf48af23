"""The body of ``train.py``: fit every artifact for the configured model, data and layer."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning
from omegaconf import DictConfig

from refusal.context import prepare
from refusal.fits import fit, summary
from refusal.geometry.plots import plot_capture

log = logging.getLogger(__name__)


def run_training(cfg: DictConfig, needs: set[str] | None = None, output_dir: Path | None = None) -> dict[str, Any]:
    """Fit, summarise (fitted.json's content) and, with ``output_dir``, plot INLP's capture of the DiM difference."""
    t0 = time.perf_counter()
    lightning.seed_everything(cfg.seed, verbose=False)
    ctx = prepare(cfg)
    fitted = fit(ctx, needs)
    out = dict(summary(ctx, fitted))
    if output_dir is not None and "capture" in out.get("inlp", {}):
        out["capture_plot"] = str(plot_capture(out["inlp"], Path(output_dir) / "capture.png",
                                               title=f"{ctx.bundle.name}, layer {fitted.dim.layer}: INLP vs the DiM difference"))
    out["timings"] = {**ctx.timings, "total": time.perf_counter() - t0}
    out["artifact_dir"] = str(ctx.artifact_dir)
    return out
