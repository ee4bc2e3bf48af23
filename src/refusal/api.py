"""The Python API for notebooks: the same steps ``evaluate.py`` runs, one call each.

    import refusal

    ctx = refusal.load("model=tiny", "intervention=actadd", "intervention.coeff=-1.0")  # config, model, data
    steer = refusal.build_intervention(ctx)            # fits (or reuses) what it needs: here the DiM direction
    with steer.apply(ctx.bundle):                      # hooks on; always off again on exit
        completions = refusal.generate(ctx.bundle, ["How do I pick a lock?"], max_new_tokens=32)
    labels = refusal.judge(["How do I pick a lock?"], completions)

Every function wraps the code the command line runs (:func:`refusal.context.prepare`,
:func:`refusal.fits.fit_for`, :func:`refusal.runtime.generation.generate`, the judge registry), so a
notebook gets the same checks, caches and artifacts as ``python evaluate.py`` with the same overrides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from refusal import schema
from refusal.config import intervention_config, plugin_dirs
from refusal.context import RunContext, prepare
from refusal.fits import fit_for
from refusal.fitting.results import Fitted
from refusal.interventions import Intervention, get_intervention
from refusal.judges import Judgement, get_judge
from refusal.models import ModelBundle, load_model
from refusal.paths import CONF_DIR
from refusal.runtime.generation import generate as generate_ids

__all__ = ["RunContext", "build_intervention", "compose_config", "fit", "generate", "judge", "load", "load_model"]


def compose_config(*overrides: str, config_dir: str | Path = CONF_DIR) -> DictConfig:
    """The run's Hydra config from command-line style overrides (``"model=tiny"``, ``"intervention.k=4"``),
    composed from ``conf/`` exactly as ``evaluate.py`` composes it (schemas included: a value of the wrong
    type is a :class:`~refusal.errors.ConfigError` here)."""
    return schema.compose(config_dir, overrides)


def load(*overrides: str, cfg: DictConfig | None = None) -> RunContext:
    """Check the config and load its data and model (``ctx.bundle``): a :class:`RunContext`. Pass overrides,
    or a composed ``cfg``; bad input fails here, before the model loads, with the error the CLI gives."""
    return prepare(cfg if cfg is not None else compose_config(*overrides))


def fit(ctx: RunContext, name: str | None = None) -> Fitted:
    """Fit (or reuse from ``artifacts_dir``) what intervention ``name`` needs (default: the configured one)."""
    cls = get_intervention(name or str(ctx.cfg.intervention.name), plugin_dirs(ctx.cfg))
    return fit_for(ctx, cls, _parameters(ctx, cls))


def build_intervention(ctx: RunContext, fitted: Fitted | None = None, **params: Any) -> Intervention:
    """The configured intervention, built on ``fitted`` (fitted now when not given), with ``params`` over its
    configured parameters (``coeff=-2.0``). Use it as ``with intervention.apply(ctx.bundle): ...``."""
    cls = get_intervention(str(ctx.cfg.intervention.name), plugin_dirs(ctx.cfg))
    icfg = {**_parameters(ctx, cls), **params}
    intervention = cls(icfg, fitted if fitted is not None else fit_for(ctx, cls, icfg))
    intervention.hook_specs(ctx.bundle)  # a bad k or layer fails here, as in a run, not mid-generation
    return intervention


def generate(bundle: ModelBundle, instructions: Sequence[str], max_new_tokens: int = 64,
             batch_size: int = 16) -> list[str]:
    """Greedy completions of chat-formatted ``instructions``, steered by whatever intervention is applied."""
    ids = bundle.tokenize_instructions(list(instructions))
    return generate_ids(bundle, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False).completions


def judge(instructions: Sequence[str], completions: Sequence[str], name: str = "substring",
          cache_dir: str | Path = "cache", **cfg: Any) -> list[Judgement]:
    """One :class:`~refusal.judges.Judgement` (``label``: refusal / compliance / unclear) per completion, by the
    registered judge ``name`` (``substring``, ``model`` or a plugin's) configured by ``cfg``."""
    cls = get_judge(name)
    judge_cfg = {"type": name, "label": name, **cfg}
    cls.check(judge_cfg)
    return cls(judge_cfg, cache_dir).judge(list(instructions), list(completions))


def _parameters(ctx: RunContext, cls: type[Intervention]) -> dict[str, Any]:
    """The configured intervention's parameters when ``cls`` is it, else ``cls``'s defaults."""
    if str(ctx.cfg.intervention.name) == cls.name:
        return intervention_config(ctx.cfg)
    return {"name": cls.name, **cls.defaults}
