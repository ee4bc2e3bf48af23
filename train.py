"""Fit what the interventions need (DiM direction, INLP projection) and save it as artifacts.

    python train.py model=qwen05 data=embedded layer=auto
    python train.py model=qwen15 layer=fixed layer.index=14 layer.position=-1
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig

from refusal.cli import friendly_errors, quiet_libraries

log = logging.getLogger("refusal.train")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@friendly_errors
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    from refusal.training import run_training

    summary = run_training(cfg)
    log.info("fitted: %s", json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
