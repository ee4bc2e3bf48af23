"""Hydra callback: write the sweep report when a multirun ends, and fail loudly if a job failed."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from refusal.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        report = write_report(sweep_dir)
        print(report.markdown_table)
        print(f"\nsweep report: {report.markdown_path}")
        if report.failures:
            for run, error in report.failures:
                print(f"FAILED {run}: {error}", file=sys.stderr)
            sys.exit(1)
