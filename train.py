"""Fit what the interventions need (DiM direction, INLP projection) and save it as artifacts.

    python train.py model=qwen05 data=embedded layer=auto
    python train.py model=qwen15 layer=fixed layer.index=14 layer.position=-1
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from refusal.app.startup import entry_point, friendly_errors, quiet_libraries
from refusal.paths import CONF_DIR

log = logging.getLogger("refusal.train")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@friendly_errors
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    from refusal.app.train import run_training
    from refusal.artifacts import atomic_write_text

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = json.dumps(run_training(cfg, output_dir=output_dir), indent=2, default=str)
    atomic_write_text(output_dir / "fitted.json", summary + "\n")
    log.info("fitted: %s", summary)


if __name__ == "__main__":
    entry_point(main, CONF_DIR)
