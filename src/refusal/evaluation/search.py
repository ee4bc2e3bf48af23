"""Checks of an Optuna search (``hydra/sweeper=optuna``), run once before its first trial.

A search that cannot work should fail in a second, not after its first trial loaded the model: the
objectives must match the directions, every searched ``intervention.*`` key must be a parameter of the
chosen intervention (its config node: the yaml of a built-in, a plugin's declared ``defaults``), and
every end of a searched range (every choice of a categorical) must pass the checks that the same value
gets on the command line (:func:`refusal.config.check_config`), so an out-of-range layer or a
non-finite number is a one-line error naming the value. Values Optuna suggests inside the checked
range reach each trial as ordinary overrides and meet those checks again there.
"""

from __future__ import annotations

from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig

from refusal.capability.tasks import configured_tasks
from refusal.config import check_config
from refusal.constraints import parse_constraints
from refusal.errors import ConfigError, RefusalError
from refusal.evaluation.trial import measures


def is_optuna(config: DictConfig) -> bool:
    return "optuna" in str(config.hydra.sweeper.get("_target_", ""))


def search_space(config: DictConfig) -> tuple[dict[str, Override], list[str]]:
    """(searched key -> its override, the fixed overrides every trial gets), as the Optuna sweeper reads
    them: ``hydra.sweeper.params`` first, then the command line's overrides; a later one replaces an
    earlier one of the same key, and a fixed value wins over a searched one."""
    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{key}={value}" for key, value in params.items()] + [str(o) for o in config.hydra.overrides.task]
    searched: dict[str, Override] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            searched[key] = override
        else:
            fixed[key] = override.input_line
    return {k: o for k, o in searched.items() if k not in fixed}, list(fixed.values())


def extremes(override: Override) -> list[str]:
    """The values of a searched override worth checking, as override values: every choice of a categorical,
    both ends of an interval, the first and last value of a range (Optuna's range includes its stop)."""
    value = override.value()
    if isinstance(value, IntervalSweep):
        return [_literal(value.start), _literal(value.end)]
    if isinstance(value, RangeSweep) and not value.shuffle:
        last = value.start + int((value.stop - value.start) // value.step) * value.step
        return [_literal(value.start), _literal(last)]
    return list(override.sweep_string_iterator())


def _literal(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, float) else str(value)


def check_objectives(config: DictConfig) -> None:
    """``optimize`` names one metric per ``hydra.sweeper.direction``, each one this evaluation reports."""
    direction = config.hydra.sweeper.get("direction")
    n = len(direction) if isinstance(direction, ListConfig) else 1
    keys = config.eval.get("optimize")
    example = "eval.optimize=[harmful/refusal_rate,harmless/kl_div] 'hydra.sweeper.direction=[minimize,minimize]'"
    if not keys:
        raise ConfigError(f"hydra/sweeper=optuna needs eval.optimize: the metrics each trial returns, one per direction, "
                          f"e.g. {example} (experiment=pareto_* sets both)")
    if len(keys) != n:
        raise ConfigError(f"eval.optimize lists {len(keys)} metrics but hydra.sweeper.direction has {n}; give one direction "
                          f"per metric, e.g. {example}")
    if config.eval.get("lean", False):
        tasks = configured_tasks(config.eval)
        for what, names in (("eval.optimize", list(keys)), ("eval.constraints", [c.key for c in parse_constraints(config.eval.get("constraints"))])):
            unmeasured = [k for k in names if not measures(k, tasks)]
            if unmeasured:
                raise ConfigError(f"{what} names {unmeasured}, which a lean trial (eval=trial) does not measure: it "
                                  "reports harmful/* (refusal), harmless/kl_div and capability/<task>/* of the tasks in "
                                  "eval.capability.tasks; add the task there, or drop eval=trial for the full metrics")


def check_parameters(config: DictConfig, searched: dict[str, Override]) -> None:
    """Every searched ``intervention.<key>`` is a parameter of the chosen intervention."""
    if any(o.key_or_group == "intervention" for o in searched.values()):
        return  # the intervention itself is searched: each trial composes its own, and Hydra checks the keys
    node = config.intervention
    declared = [k for k in node if k != "name"]
    for override in searched.values():
        key = override.key_or_group
        if key.startswith("intervention."):
            param = key.split(".")[1]
            if param not in declared:
                raise ConfigError(f"the search varies {key}, which is not a parameter of intervention {node.name!r} "
                                  f"(its parameters: {', '.join(declared)}); search one of those")


def check_values(config: DictConfig, searched: dict[str, Override], fixed: list[str]) -> None:
    """Compose a trial's config at every extreme of every searched value and run the command-line checks."""
    loader = GlobalHydra.instance().config_loader()
    for key, override in searched.items():
        for value in extremes(override):
            try:
                check_config(loader.load_sweep_config(config, [*fixed, f"{key}={value}"]))
            except (RefusalError, HydraException) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"the search range {override.input_line} reaches "
                                  f"{key}={value}, which fails: {first}") from None


def check_search(config: DictConfig) -> None:
    """All checks of an Optuna search; raises :class:`ConfigError` with one line."""
    check_objectives(config)
    searched, fixed = search_space(config)
    if not searched:
        raise ConfigError("the Optuna search has no parameter to vary: give hydra.sweeper.params (experiment=pareto_* "
                          "does) or a range on the command line, e.g. 'intervention.alpha=interval(0.5,2.0)'")
    check_parameters(config, searched)
    check_values(config, searched, fixed)
