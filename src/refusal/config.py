"""Config checks that run before anything expensive, with errors that name the fix."""

from __future__ import annotations

import difflib
import importlib.util
import re
import warnings
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from refusal.capability.tasks import check_capability, configured_tasks
from refusal.checks import check_number
from refusal.constraints import parse_constraints
from refusal.errors import ConfigError
from refusal.fitting.inlp import INLPConfig
from refusal.fitting.leace import INSTALL_HINT
from refusal.interventions import Intervention, get_intervention
from refusal.interventions.registry import INTERVENTIONS, available
from refusal.interventions.scope import Scope, check_k, check_layer
from refusal.judges import judge_names
from refusal.judges.quality import QualityScorer
from refusal.models.loader import check_placement
from refusal.paths import CONF_DIR, PLUGINS_DIR
from refusal.schema import check_schema


@dataclass(frozen=True)
class LayerSpec:
    mode: str  # auto | cosmic | fixed | relative
    layer: int | None
    position: int | None
    tag: str  # names the artifact: auto, L14_P-1, ...


def resolve_layer_spec(layer_cfg: Any, n_layers: int | None, n_positions: int | None = None) -> LayerSpec:
    """Turn ``layer=auto|fixed|relative`` into a concrete spec, checking the layer and position against the
    model when its sizes are known (types and ranges: the layer schemas, :mod:`refusal.schema`)."""
    mode = layer_cfg.get("mode")
    if mode == "auto":
        return LayerSpec("auto", None, None, "auto")
    if mode == "cosmic":
        return LayerSpec("cosmic", None, None, "cosmic")
    if mode not in ("fixed", "relative"):
        raise ConfigError(f"layer.mode={mode!r}; use layer=auto, layer=cosmic, layer=fixed or layer=relative")
    position = layer_cfg.get("position", -1)
    if n_positions is not None and position < -n_positions:
        raise ConfigError(
            f"layer.position={position} is out of range: this model's chat template has {n_positions} "
            f"post-instruction tokens, so use -1..-{n_positions}"
        )
    if mode == "fixed":
        index = layer_cfg.get("index")
        if index is None:
            raise ConfigError("layer=fixed needs layer.index (the block whose input the direction is read at), "
                              "e.g. layer.index=14")
    else:
        fraction = layer_cfg.get("fraction")
        if n_layers is None:
            return LayerSpec("relative", None, position, f"rel{fraction:g}_P{position}")
        index = min(n_layers - 1, int(round(fraction * (n_layers - 1))))
    if n_layers is not None and not 0 <= index < n_layers:
        raise ConfigError(f"layer.index={index} is out of range for a model with {n_layers} layers (use 0..{n_layers - 1})")
    return LayerSpec(mode, index, position, f"L{index}_P{position}")


def _check_intervention(cfg: DictConfig, n_layers: int | None = None) -> None:
    icfg = cfg.intervention
    cls = get_intervention(str(icfg.name), plugin_dirs(cfg))
    for key, value in icfg.items():  # every numeric parameter, plugins' included: no NaN or inf anywhere
        if isinstance(value, float):
            check_number(value, f"intervention.{key}")
    for key in ("coeff", "alpha"):
        if key in icfg and icfg[key] is not None:
            check_number(icfg[key], f"intervention.{key}")
    if icfg.get("alpha") is not None and icfg.alpha < 0:
        raise ConfigError(f"intervention.alpha={icfg.alpha:g} must be >= 0 (how far past the centre an activation is "
                          "moved, towards intervention.target); to move towards the other class set intervention.target")
    _unknown_parameters(cls, set(icfg), cfg)
    cls.check_params(OmegaConf.to_container(icfg, resolve=True), n_layers)  # a plugin's own checks, before the model loads
    if cls.k_counts_inlp_directions:  # INLP finds at most n_iterations directions: a larger k can only fail
        n_iter = cfg.fit.inlp.get("n_iterations")
        check_k(icfg.get("k"), n_iter if isinstance(n_iter, int) else None)
    if "leace" in cls.needs and importlib.util.find_spec("concept_erasure") is None:
        raise ConfigError(f"intervention {cls.name!r} needs the concept-erasure package: {INSTALL_HINT}")
    scope = Scope.from_config(icfg, cls.default_layers)
    scope.check_range(n_layers)
    if icfg.get("export") and (scope.layers != "all" or scope.positions != "all"):
        raise ConfigError(f"intervention.export=true bakes the ablation into every layer's weights for every token, "
                          f"but this run's scope is {scope.label()}; drop export or use layers=all positions=all")
    check_layer(icfg.get("layer"), n_layers)


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_safe_name(value: Any, key: str) -> None:
    """Names become folder/file names under cache_dir and artifacts_dir: no separators, no '..'."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"{key}={value!r} is used as a file or folder name under cache_dir/artifacts_dir, so it may only "
            "hold letters, digits, '.', '_' and '-' (no path separators or '..'); rename it"
        )


def _check_model(model: Any) -> None:
    _check_safe_name(model.get("name"), "model.name")
    gguf = model.get("gguf")
    if gguf is not None and gguf.get("filename") is not None:
        _check_safe_name(gguf.get("filename"), "model.gguf.filename")
    check_placement(OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model))


def split_inlp_settings(icfg: Any) -> tuple[str, bool, dict[str, Any]]:
    """``fit.inlp`` as (positions, per_layer, the INLPConfig fields): what selects data and what fits."""
    options = OmegaConf.to_container(icfg, resolve=True) if isinstance(icfg, DictConfig) else dict(icfg)
    return options.pop("positions", "all"), options.pop("per_layer", False), options


#: Keys every intervention takes (what it is, and where it acts), declared or not.
COMMON_KEYS = frozenset({"name", "layer", "layers", "positions"})


def intervention_parameters(cls: type) -> frozenset[str]:
    """The keys ``intervention=<name>`` declares: its ``conf/intervention/<name>.yaml`` (which wins, as in
    Hydra) or else its class's ``defaults``, plus :data:`COMMON_KEYS`."""
    yaml = CONF_DIR / "intervention" / f"{cls.name}.yaml"
    keys = OmegaConf.load(yaml).keys() if yaml.exists() else cls.defaults.keys()
    return COMMON_KEYS | {str(k) for k in keys}


def _unknown_parameters(cls: type, given: set[str], cfg: DictConfig) -> None:
    """A key no intervention declares is a typo (``+intervention.coef=2``): an error naming the close ones. A key
    only other interventions declare (``++intervention.k=4`` over a multirun) is ignored here, with a warning."""
    unknown = sorted(given - intervention_parameters(cls))
    if not unknown:
        return
    available(plugin_dirs(cfg))
    others = set().union(*(intervention_parameters(c) for c in INTERVENTIONS.classes.values()))
    typos = [k for k in unknown if k not in others]
    if typos:
        close = difflib.get_close_matches(typos[0], sorted(intervention_parameters(cls) | others), n=1)
        hint = f"; did you mean intervention.{close[0]}?" if close else ""
        raise ConfigError(f"intervention.{typos[0]} is not a parameter of intervention={cls.name} (its parameters: "
                          f"{', '.join(sorted(intervention_parameters(cls) - {'name'}))}){hint}")
    if "export" in unknown and cfg.intervention.get("export"):
        exportable = sorted(c.name for c in INTERVENTIONS.classes.values() if c.export_weights is not Intervention.export_weights)
        warnings.warn(f"intervention={cls.name} is not an edit of the weights: intervention.export=true saves nothing for "
                      f"it (weight-exportable: {', '.join(exportable)})", stacklevel=3)
        unknown.remove("export")
    if unknown:
        warnings.warn(f"intervention={cls.name} has no parameter {', '.join(unknown)} (set for the other interventions "
                      "of this run); ignored", stacklevel=3)


def intervention_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.intervention`` as a dict of what the chosen intervention declares: keys set with ``++`` for the other
    jobs of a multirun are left out, so they neither reach it nor show in its recorded params."""
    cls = get_intervention(str(cfg.intervention.name), plugin_dirs(cfg))
    icfg = OmegaConf.to_container(cfg.intervention, resolve=True)
    return {k: v for k, v in icfg.items() if k in intervention_parameters(cls)}


def plugin_dirs(cfg: DictConfig) -> list[str]:
    return [str(PLUGINS_DIR), *[str(p) for p in (cfg.get("plugin_dirs") or [])]]


def check_config(cfg: DictConfig, bundle: Any = None) -> None:
    """Validate everything checkable; with ``bundle``, also check declared sizes against the real model. Types
    were checked when Hydra composed ``cfg``; ranges, choices and keys added with ``+`` by the schemas
    (:mod:`refusal.schema`) first; what follows are rules over several fields or against the model."""
    check_schema(cfg)
    n_layers = cfg.model.get("n_layers")
    n_positions = None
    if bundle is not None:
        for key, real in (("n_layers", bundle.n_layers), ("d_model", bundle.d_model)):
            declared = cfg.model.get(key)
            if declared is not None and declared != real:
                raise ConfigError(f"model.{key}={declared} in the config, but the loaded {bundle.name} has {real}; fix conf/model/{bundle.name}.yaml")
        n_layers, n_positions = bundle.n_layers, len(bundle.post_instruction_ids)
    _check_model(cfg.model)
    resolve_layer_spec(cfg.layer, n_layers, n_positions)
    _check_intervention(cfg, n_layers)
    _, _, options = split_inlp_settings(cfg.fit.inlp)
    INLPConfig(**options).validate()  # the fitter's own ranges (l2, lr, ...), before any model loads
    if "eval" in cfg:
        _check_eval(cfg.eval)


def _check_eval(ecfg: Any) -> None:
    judge_names(ecfg)
    decoded, judged = ecfg.get("generate_new_tokens"), ecfg.get("max_new_tokens")
    if decoded is not None and judged is not None and decoded < judged:
        raise ConfigError(f"eval.generate_new_tokens={decoded} is below eval.max_new_tokens={judged}: a completion "
                          f"cannot be judged on more tokens than were generated; set it to at least {judged}, or null")
    if ecfg.get("capability") is not None:
        check_capability(ecfg.capability)
    if ecfg.get("quality"):
        QualityScorer.check(ecfg.get("quality_judge") or {})
    tasks = configured_tasks(ecfg)
    for c in parse_constraints(ecfg.get("constraints")):
        if c.key.startswith("capability/") and c.key.split("/")[1] not in tasks:
            raise ConfigError(f"eval.constraints has '{c}', but {c.key.split('/')[1]!r} is not in eval.capability.tasks "
                              f"({tasks}); add it, e.g. eval.capability.tasks=[{c.key.split('/')[1]}]")
