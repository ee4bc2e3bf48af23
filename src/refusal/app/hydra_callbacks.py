"""Hydra callbacks: check an Optuna search before its first trial; write the sweep report when a multirun
ends, and fail loudly if a job failed."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from refusal.errors import RefusalError
from refusal.evaluation.search import check_search, is_optuna
from refusal.report import write_report

log = logging.getLogger(__name__)


class SweepCheck(Callback):
    """An Optuna search whose parameters or ranges cannot work is one ``error:`` line (exit 2) before
    any trial runs (see :mod:`refusal.evaluation.search`); other sweepers are left alone."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_optuna(config):
            return
        try:
            check_search(config)
        except RefusalError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        report = write_report(sweep_dir)
        print(report.markdown_table)
        print(f"\nsweep report: {report.markdown_path}")
        if report.failures:
            for run, error in report.failures:
                print(f"FAILED {run}: {error}", file=sys.stderr)
            sys.exit(1)
