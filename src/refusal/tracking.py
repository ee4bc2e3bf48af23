"""Experiment tracking: Weights & Biases (offline by default), CSV, or nothing.

W&B runs are written under the Hydra run directory (``wandb sync <dir>/wandb/offline-run-*``
uploads them later); config is logged flat (``model.name``, ``intervention.k``...), metrics as the
run summary, sample completions as a ``wandb.Table`` and plots as images. The runs of one
Hydra multirun share a group named after the sweep folder and are tagged with model and
intervention, so a dashboard can pivot on them.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from refusal.artifacts import atomic_write_text
from refusal.schema import check_logger


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists -> ``{"a.b.c": value}``; lists of scalars are kept whole."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _sweep_group() -> str | None:
    try:
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except (ValueError, ImportError):
        pass
    return None


class Tracker:
    """Interface of the trackers: log one run's results, then finish."""

    def log_results(self, results: dict[str, Any], rows: list[dict], images: list[Path]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class CSVTracker(Tracker):
    def __init__(self, output_dir: Path, config: dict[str, Any]):
        self.output_dir = output_dir
        self.config = config

    def log_results(self, results: dict[str, Any], rows: list[dict], images: list[Path]) -> None:
        flat = {**{f"config.{k}": v for k, v in flatten(self.config).items()}, **flatten(results["metrics"])}
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(flat))
        writer.writeheader()
        writer.writerow(flat)
        atomic_write_text(self.output_dir / "metrics.csv", buf.getvalue())


class WandbTracker(Tracker):
    def __init__(self, cfg: DictConfig, output_dir: Path, config: dict[str, Any]):
        import wandb

        lcfg = cfg.logger
        mode = str(lcfg.get("mode", "offline"))
        folder = Path(lcfg.get("dir") or output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.wandb = wandb
        self.run = wandb.init(
            project=str(lcfg.get("project", "refusal")),
            entity=lcfg.get("entity"),
            mode=mode,
            dir=str(folder),
            group=lcfg.get("group") or _sweep_group(),
            tags=[str(cfg.model.name), str(cfg.intervention.name), *list(lcfg.get("tags") or [])],
            name=f"{cfg.model.name}-{cfg.intervention.name}",
            config=flatten(config),
            reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def log_results(self, results: dict[str, Any], rows: list[dict], images: list[Path]) -> None:
        flat = {k: v for k, v in flatten(results["metrics"]).items() if isinstance(v, (int, float))}
        for key, value in results["metrics"].items():  # intervals (Wilson, paired): their ends as numbers
            if key.endswith("_ci95") and isinstance(value, list) and len(value) == 2:
                flat[f"{key}/lo"], flat[f"{key}/hi"] = value
        for key, value in flatten(results.get("geometry", {})).items():
            if isinstance(value, (int, float)):
                flat[f"geometry/{key}"] = value
        self.run.summary.update(flat)
        self.run.summary.update({"layer": results.get("layer"), "position": results.get("position")})
        n = int(self.run.config.get("eval.n_samples_table", 16) or 16)
        table = self.wandb.Table(columns=["split", "prompt", "completion", "refused", "baseline_completion"])
        for split in ("harmful", "harmless"):
            for row in [r for r in rows if r["split"] == split][:n]:
                table.add_data(row["split"], row["prompt"], row["completion"], row["refused"], row["baseline_completion"])
        payload: dict[str, Any] = {"completions": table}
        for image in images:
            payload[f"plots/{image.stem}"] = self.wandb.Image(str(image))
        self.run.log(payload)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg: DictConfig, output_dir: Path) -> Tracker | None:
    check_logger(cfg)
    name = str(cfg.logger.get("name", "none"))
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    if name == "none":
        return None
    if name == "csv":
        return CSVTracker(output_dir, config)
    return WandbTracker(cfg, output_dir, config)  # the schema allows no other name
