"""The main job: fit what is missing, apply an intervention, generate, score, log.

    python evaluate.py experiment=compare                # baseline + 4 interventions, one load, one fit
    python evaluate.py                                   # qwen05, embedded data, no intervention
    python evaluate.py intervention=inlp_flip intervention.k=4
    python evaluate.py -m model=qwen05,qwen15 intervention=none,actadd,dim_ablation,inlp_nullspace,inlp_flip
    python evaluate.py experiment=pareto_inlp_flip       # Optuna search: refusal vs KL, the Pareto front in the report
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from refusal.app.startup import entry_point, friendly_errors, quiet_libraries
from refusal.paths import CONF_DIR

log = logging.getLogger("refusal.evaluate")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@friendly_errors
def main(cfg: DictConfig) -> float | list[float] | None:
    """One evaluation; returns the ``eval.optimize`` metrics to a sweeper that searches (Optuna), else None."""
    quiet_libraries()
    from refusal.evaluation import run_evaluation
    from refusal.evaluation.trial import objectives
    from refusal.report import format_run

    results = run_evaluation(cfg, HydraConfig.get().runtime.output_dir)
    print(format_run(results))
    return objectives(results, cfg.eval.get("optimize"))


if __name__ == "__main__":
    entry_point(main, CONF_DIR)
