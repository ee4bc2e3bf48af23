"""The config groups' schemas: dataclasses registered in Hydra's ConfigStore, one validation style.

Each fixed-shape group's yaml starts its defaults list with its schema (``conf/eval/default.yaml``:
``defaults: [base_eval, _self_]``), as Hydra's "structured config as schema" pattern, so

- a value of the wrong type (``eval.batch_size=abc``, ``seed=a``, ``fit.dim.share_prefix=maybe``) fails when
  Hydra composes the config, with OmegaConf's ``ValidationError`` (:func:`compose` and the entry points turn
  it into one :class:`ConfigError` line naming the key, the type and an example);
- a key the schema lacks fails at compose time too (``fit.dim.max_k=1``: Hydra's "Could not override");
  one added with ``+`` is caught by :func:`check_schema`, which names the valid keys;
- ranges and choices are the fields' metadata (:func:`at_least`, :func:`within`, :func:`one_of`), checked by
  :func:`check_schema` before anything loads.

The groups: the primary config, ``model``, ``data`` and ``layer`` (a schema per source or mode), ``fit``,
``eval``, ``geometry`` and ``judge`` (a schema per judge kind). Rules that span several fields (or the config
and the model) stay hand-written in :mod:`refusal.config`. The ``intervention`` group has no
schema: plugins add their own parameters (``Intervention.check_params``); ``eval.test_sets`` and the
judges' ``model`` stay open mappings (user-named sets, model names or configs).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf, ValidationError
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

from refusal.errors import ConfigError


# -- field metadata: ranges and choices ------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """What a field's value may be beyond its type: from ``low`` to ``high`` (either may be absent, each end
    excluded when said), one of ``choices``, or strictly a boolean; ``why`` and ``example`` go into the error."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    strict_bool: bool = False
    why: str = ""
    example: Any = None

    def allows(self, value: Any) -> bool:
        if self.strict_bool:
            return isinstance(value, bool)
        if self.choices:
            return value in self.choices
        return ((self.low is None or (value > self.low if self.low_open else value >= self.low))
                and (self.high is None or (value < self.high if self.high_open else value <= self.high)))

    def message(self, key: str, value: Any) -> str:
        why = f" ({self.why})" if self.why else ""
        if self.strict_bool:
            return f"{key}={value!r} must be true or false{why}"
        if self.choices:
            options = [repr(c) for c in self.choices]
            said = " or ".join(options) if len(options) == 2 else f"one of {', '.join(options)}"
            return f"{key}={value!r} must be {said}{why}"
        if self.low is not None and self.high is not None:
            bound = f"within {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        else:
            side = f"{'>' if self.low_open else '>='} {self.low:g}" if self.high is None else f"<= {self.high:g}"
            bound = f"an integer {side}" if isinstance(value, int) else side
        shown = repr(value) if isinstance(value, int) else f"{value:g}"
        return f"{key}={shown} must be {bound}{why}, e.g. {key}={self.example}"


def at_least(low: float, why: str, example: Any, *, default: Any) -> Any:
    """A field whose value is ``>= low``, or null where its type allows it."""
    return field(default=default, metadata={"bound": Bound(low=low, why=why, example=example)})


def at_most(high: float, why: str, example: Any, *, default: Any) -> Any:
    return field(default=default, metadata={"bound": Bound(high=high, why=why, example=example)})


def within(low: float, high: float, why: str, example: Any, *, default: Any, low_open: bool = False,
           high_open: bool = False) -> Any:
    return field(default=default, metadata={"bound": Bound(low=low, high=high, low_open=low_open, high_open=high_open,
                                                           why=why, example=example)})


def one_of(choices: Sequence[str], why: str = "", *, default: str) -> Any:
    return field(default=default, metadata={"bound": Bound(choices=tuple(choices), why=why)})


# -- the schemas -----------------------------------------------------------------------------------
@dataclass
class ConfigSchema:
    """The primary config's own keys (the groups are typed by their own schemas)."""

    seed: int = 0
    artifacts_dir: str = "artifacts"
    cache_dir: str = MISSING
    plugin_dirs: list[str] = field(default_factory=list)
    progress: bool = True
    resume: bool = False
    model: Any = None
    data: Any = None
    layer: Any = None
    intervention: Any = None
    fit: Any = None
    eval: Any = None
    logger: Any = None
    geometry: Any = None
    judge: Any = None


@dataclass
class ModelSchema:
    """``conf/model/<name>.yaml``. Placement (device, dtype, device_map, matmul) is checked against torch by
    :func:`refusal.models.loader.check_placement`; the source-specific keys are null where unused."""

    name: str = MISSING
    source: str = MISSING
    upstream: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    path: str | None = None
    gguf: dict[str, Any] | None = None
    tiny: dict[str, Any] | None = None
    n_layers: int | None = at_least(1, "blocks of the model, declared so layers are checked before it loads", 24,
                                       default=None)
    d_model: int | None = at_least(1, "the residual width", 896, default=None)
    dtype: str = "float32"
    matmul: str = "float32"
    device: str = "auto"
    device_map: Any = None
    # Typed Any, checked strictly: OmegaConf would read 'yes' or 'on' as true, and only a boolean true may run remote code.
    trust_remote_code: Any = field(default=False, metadata={"bound": Bound(strict_bool=True, why="a boolean, not a string")})
    chat_template: str | None = None
    system_prompt: str | None = None
    refusal_tokens: list[str] = field(default_factory=lambda: ["I", "As"])
    stop_tokens: list[str] = field(default_factory=list)
    batch_size: int = at_least(1, "rows per forward pass", 16, default=32)


SPLIT = "per class; null = all that is left after the other splits"


@dataclass
class DataSchema:
    """``conf/data/<name>.yaml``: the source and its split sizes (at most one null: a rule over three
    fields, checked by :func:`refusal.data.splits.load_splits`)."""

    name: str = MISSING
    seed: int = 0
    n_train: int | None = at_least(1, f"train prompts {SPLIT}", 64, default=None)
    n_val: int | None = at_least(1, f"val prompts {SPLIT}", 16, default=None)
    n_test: int | None = at_least(1, f"test prompts {SPLIT}", 32, default=None)


@dataclass
class FilesDataSchema(DataSchema):
    harmful_path: str = MISSING
    harmless_path: str = MISSING
    column: str = "instruction"


@dataclass
class SplitsDataSchema(DataSchema):
    dir: str = MISSING


@dataclass
class HubDataSchema(DataSchema):
    harmful_dataset: str = MISSING
    harmful_column: str = "prompt"
    harmful_split: str = "train"
    harmless_dataset: str = MISSING
    harmless_column: str = "instruction"
    harmless_split: str = "train"
    cache_dir: str | None = None


POSITION = "an offset from the end of the prompt's post-instruction tokens, -1 = the last"


@dataclass
class LayerSchema:
    """``conf/layer/<mode>.yaml``: ``layer=auto`` has only its mode; each other mode adds its own settings.
    Whether a layer or position exists is a rule against the model (:func:`refusal.config.resolve_layer_spec`)."""

    mode: str = "auto"


@dataclass
class FixedLayerSchema(LayerSchema):
    index: int = MISSING
    position: int = at_most(-1, POSITION, -1, default=-1)


@dataclass
class RelativeLayerSchema(LayerSchema):
    fraction: float = within(0, 1, "the depth: 0 = the first layer, 1 = the last", 0.6, default=0.6)
    position: int = at_most(-1, POSITION, -1, default=-1)


@dataclass
class CosmicLayerSchema(LayerSchema):
    """COSMIC's settings (:class:`refusal.fitting.cosmic.CosmicConfig`)."""

    fraction: float = within(0, 1, "the share of layers read, at least one", 0.1, default=0.1, low_open=True)
    max_kl: float = at_least(0, "the harmless next-token KL an ablation may cause", 0.1, default=0.1)
    prune_last_fraction: float = within(0, 1, "the share of last layers whose candidates are dropped", 0.2,
                                        default=0.2, high_open=True)
    n_prompts: int | None = at_least(1, "val prompts per class scored; null = all", 16, default=None)
    batch_size: int = at_least(1, "rows (candidates x prompts) per forward pass", 32, default=32)


@dataclass
class DimSchema:
    """``fit.dim``: DiM selection (:class:`refusal.fitting.dim.SelectionConfig`)."""

    max_kl: float = at_least(0, "the KL a candidate's ablation may move harmless next-token distributions", 0.1,
                             default=0.1)
    min_induce: float = 0.0
    induce_rule: str = one_of(("relative", "absolute"), "relative: induce over the unsteered harmless score; "
                              "absolute: Arditi et al.'s induce > min_induce", default="relative")
    prune_last_fraction: float = within(0, 1, "the share of last layers whose candidates are dropped", 0.2,
                                        default=0.2, high_open=True)
    positions: str = one_of(("all", "last"), default="all")
    shortlist: int = at_least(0, "0 = no shortlist, N = the best N layers", 2, default=2)
    n_prompts: int | None = at_least(1, "val prompts per class scored; null = the whole val split", 16, default=16)
    batch_size: int = at_least(1, "rows per scoring forward pass", 32, default=48)
    share_prefix: bool = True


@dataclass
class InlpSchema:
    """``fit.inlp``: what selects INLP's data (positions, per_layer) and :class:`refusal.fitting.inlp.INLPConfig`'s
    fields (whose own ranges :meth:`INLPConfig.validate` checks before any model loads)."""

    n_iterations: int = at_least(1, "a cap on the directions INLP fits", 300, default=300)
    classifier: str = "logistic"
    epsilon: float = within(0, 0.5, "INLP stops once held-out accuracy is within epsilon of chance: a negative epsilon "
                            "may never allow it, running to the n_iterations cap, and 0.5 or more always does, after "
                            "one direction", 0.02, default=0.02, high_open=True)
    positions: str = one_of(("all", "selected"), default="all")
    per_layer: bool = False
    seed: int = 0
    accelerator: str = "auto"
    l2: float = 1e-3
    batch_size: int | None = None
    max_steps: int = 500
    max_epochs: int = 20
    lr: float = 0.1
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-10
    center: str = "midpoint"
    devices: Any = 1


@dataclass
class FitSchema:
    dim: DimSchema = field(default_factory=DimSchema)
    inlp: InlpSchema = field(default_factory=InlpSchema)
    filter_train: bool = True
    filter_val: bool = True


@dataclass
class CapabilitySchema:
    """``eval.capability``: the task names and MMLU subjects are checked by :func:`refusal.capability.tasks.check_capability`."""

    tasks: list[str] = field(default_factory=list)
    mmlu_subjects: list[str] | None = None
    mmlu_per_subject: int = at_least(1, "MMLU test questions per subject", 4, default=4)
    n: int | None = at_least(1, "items of every other task, null = all", 100, default=100)
    seed: int = 0
    batch_size: int = at_least(1, "rows per scoring forward pass", 16, default=16)


@dataclass
class QualityJudgeSchema:
    model: Any = "qwen15"  # a conf/model name or a model config mapping
    batch_size: int = at_least(1, "rows per judge forward pass", 8, default=8)
    matmul: str | None = None  # the judge model's products (checked with model.matmul's rule by the scorer)
    n: int | None = at_least(1, "harmful prompts scored per column (a seeded sample; null: all)", 100, default=None)
    columns: list[str] | None = None  # the harmful columns to score (null: every one)
    # added after runs were finished: null (the defaults, judge and 96) keeps their fingerprints (refusal.evaluation.resume)
    refused: str | None = one_of(("judge", "rubric"), "item 1 (explicit refusal): the primary refusal judge's label or "
                                 "the judge model's digit", default=None)
    reasoning_tokens: int | None = at_least(0, "the judge's overall-reasoning line, in tokens (0: prefilled answers "
                                            "only)", 96, default=None)


@dataclass
class EvalSchema:
    """``conf/eval``: ``judges`` may be one name or a list (:func:`refusal.judges.judge_names`); ``test_sets`` is
    open: the user names the sets."""

    max_new_tokens: int = at_least(1, "new tokens per completion", 64, default=64)
    generate_new_tokens: int | None = at_least(1, "tokens generated per completion, of which the first max_new_tokens "
                                                  "are judged (null: max_new_tokens)", 512, default=None)
    lean: bool = False
    optimize: list[str] | None = None
    constraints: list[str] = field(default_factory=list)
    batch_size: int = at_least(1, "rows per generation batch", 16, default=64)
    perplexity_text: str | None = None
    n_samples_table: int = at_least(0, "completions shown in the W&B table", 16, default=16)
    judges: Any = field(default_factory=lambda: ["substring"])
    quality: bool = False
    quality_judge: QualityJudgeSchema = field(default_factory=QualityJudgeSchema)
    test_sets: dict[str, Any] | None = None
    capability: CapabilitySchema | None = field(default_factory=CapabilitySchema)


@dataclass
class GeometrySchema:
    enabled: bool = True
    downstream: list[int] = field(default_factory=lambda: [2, 4])


@dataclass
class LoggerSchema:
    """``conf/logger``: where metrics go. Checked where the tracker is made (:func:`check_logger`), which comes
    before the rest of the config's check, so a job that fails on its config still records it."""

    name: str = one_of(("wandb", "csv", "none"), default="none")
    mode: str = one_of(("offline", "online", "disabled"), "W&B: offline runs are synced later with wandb sync",
                       default="offline")
    project: str = "refusal"
    entity: str | None = None
    dir: str | None = None  # W&B's folder (default: the run's output folder)
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class SubstringJudgeSchema:
    type: str = "substring"
    markers: Any = "arditi"  # arditi, heretic or a list of phrases (checked by the judge)


@dataclass
class ModelJudgeSchema:
    type: str = "model"
    model: Any = "qwen15"  # a conf/model name or a model config mapping
    chat: str = "rubric"
    rubric: str | None = None
    answers: dict[str, list[str]] = field(default_factory=lambda: {"refusal": ["Yes"], "compliance": ["No"]})
    matmul: str | None = None  # the judge model's products (checked with model.matmul's rule by the judge)
    threshold: float | None = None
    batch_size: int = at_least(1, "rows per judge forward pass", 8, default=8)


@dataclass
class EnsembleJudgeSchema:
    type: str = "ensemble"
    rule: str = "any"
    members: dict[str, Any] = field(default_factory=dict)


#: group -> schema name -> node, stored in the ConfigStore. A judge yaml defines ``judge.<name>``, so its schema
#: is a mapping holding that name.
SCHEMAS: dict[str | None, dict[str, Any]] = {
    None: {"base_config": ConfigSchema},
    "model": {"base_model": ModelSchema},
    "data": {"base_data": DataSchema, "base_data_files": FilesDataSchema, "base_data_splits": SplitsDataSchema,
             "base_data_hub": HubDataSchema},
    "layer": {"base_layer": LayerSchema, "base_layer_fixed": FixedLayerSchema, "base_layer_relative": RelativeLayerSchema,
              "base_layer_cosmic": CosmicLayerSchema},
    "fit": {"base_fit": FitSchema},
    "eval": {"base_eval": EvalSchema},
    "geometry": {"base_geometry": GeometrySchema},
    "logger": {"base_logger": LoggerSchema},
    "judge": {f"base_{name}": {name: schema} for name, schema in (
        ("substring", SubstringJudgeSchema), ("heretic", SubstringJudgeSchema), ("model", ModelJudgeSchema),
        ("model_fewshot", ModelJudgeSchema), ("llama_guard", ModelJudgeSchema), ("harmbench", ModelJudgeSchema),
        ("ensemble", EnsembleJudgeSchema))},
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent): before any compose of ``conf/``."""
    store = ConfigStore.instance()
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            store.store(group=group, name=name, node=node)


@contextmanager
def config_dir(path: str | Path) -> Iterator[None]:
    """Hydra initialised on ``path`` with the schemas registered (every compose of this project goes through it)."""
    register()
    with initialize_config_dir(config_dir=str(Path(path).resolve()), version_base="1.3"):
        yield


def compose(path: str | Path, overrides: Sequence[str] = (), config_name: str = "config", **kwargs: Any) -> DictConfig:
    """The config Hydra composes from ``path``; a value of the wrong type is one :class:`ConfigError`."""
    with config_dir(path):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides), **kwargs)
        except HydraException as err:
            raise type_error(err) or err from err


# -- errors: the type at compose time, ranges and added keys after ---------------------------------
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def type_error(err: BaseException, prefix: str = "") -> ConfigError | None:
    """Hydra's composition error for a value its schema's type refuses, as one line naming the key, what it
    must be and an example (the field's default); None for any other error (Hydra's own message stands)."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, ValidationError):
        cause = cause.__cause__
    if cause is None or not getattr(cause, "full_key", None):
        return None
    schema, name = getattr(cause, "object_type", None), str(getattr(cause, "key", ""))
    found = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    if name not in found:
        return ConfigError(f"{prefix}{cause.full_key}: {str(cause).splitlines()[0]}")
    spec, kind = found[name], _plain_type(get_type_hints(schema)[name])
    key, value = f"{prefix}{cause.full_key}", cause.value
    if get_origin(kind) in (list, dict):
        listed = get_origin(kind) is list
        example = f"[{value}]" if listed and isinstance(value, str) else "[...]" if listed else "{...}"
        return ConfigError(f"{key}={value!r} must be {'a list' if listed else 'a mapping'}, e.g. {key}={example}")
    default = spec.default if spec.default is not dataclasses.MISSING else None
    example = f", e.g. {key}={str(default).lower() if isinstance(default, bool) else default}" \
        if default not in (None, MISSING) else ""
    return ConfigError(f"{key}={value!r} must be {_KINDS.get(kind, f'of type {kind}')}{example}")


def _plain_type(hint: Any) -> Any:
    """``Optional[int]`` -> int; other hints as they are."""
    args = [a for a in get_args(hint) if a is not type(None)]
    return args[0] if get_origin(hint) in (Union, types.UnionType) and len(args) == 1 else hint


#: Keys that belong elsewhere: the key a user wrote -> (where it lives, why).
_EVERY_FIT = "it filters the prompts of every fit, not only DiM's"
MOVED_KEYS = {"fit.dim.filter_train": ("fit.filter_train", _EVERY_FIT), "fit.dim.filter_val": ("fit.filter_val", _EVERY_FIT)}


#: A judge's ``type`` -> the schema of its settings.
JUDGE_TYPES = {"substring": SubstringJudgeSchema, "model": ModelJudgeSchema, "ensemble": EnsembleJudgeSchema}


def check_schema(cfg: DictConfig) -> None:
    """Every node a schema types, checked against its fields' metadata (ranges, choices) and for keys added
    with ``+`` that it lacks; a judge added on the command line (``+judge.mine={type: model, ...}``) is typed by
    its ``type`` here. Runs before anything loads."""
    _check_node(cfg, "")
    for name, entry in (cfg.get("judge") or {}).items():
        if not isinstance(entry, DictConfig) or dataclasses.is_dataclass(OmegaConf.get_type(entry)) \
                or entry.get("type") not in JUDGE_TYPES:
            continue
        try:
            typed = OmegaConf.merge(OmegaConf.structured(JUDGE_TYPES[entry.type]), entry)
        except OmegaConfBaseException as err:
            raise type_error(err, f"judge.{name}.") or ConfigError(f"judge.{name}: {str(err).splitlines()[0]}") from err
        _check_node(typed, f"judge.{name}.")


def check_logger(cfg: DictConfig) -> None:
    """The ``logger`` node alone, as :func:`check_schema` checks every node (the tracker is made first)."""
    _check_node(cfg.logger, "logger.")


def _check_node(node: DictConfig, path: str) -> None:
    schema = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for key in node:
        full = f"{path}{key}"
        if full == "hydra" or OmegaConf.is_missing(node, key):
            continue  # Hydra's own; a value left ??? is named by what needs it (layer.index, data.harmful_path)
        if fields and key not in fields:
            _unknown(full, path, sorted(fields), node[key])
        bound = fields[key].metadata.get("bound") if key in fields else None
        try:
            value = node[key]
        except InterpolationResolutionError:  # resolves only in a running Hydra (logger.dir: ${hydra:runtime.output_dir})
            continue
        if bound is not None and value is not None and not bound.allows(value):
            raise ConfigError(bound.message(full, value))
        if fields and isinstance(value, float) and not math.isfinite(value):  # an open group checks its own
            raise ConfigError(f"{full}={value} must be a finite number")
        if isinstance(value, DictConfig):
            _check_node(value, f"{full}.")


def _unknown(full: str, path: str, valid: list[str], value: Any) -> None:
    group = path.rstrip(".")
    if full in MOVED_KEYS:
        target, why = MOVED_KEYS[full]
        raise ConfigError(f"{full} is not a {group} key: the switch is {target} ({why}); write {target}={str(value).lower()}")
    close = difflib.get_close_matches(full.rsplit(".", 1)[-1], valid, n=1)
    hint = f"; did you mean {group}.{close[0]}?" if close else ""
    raise ConfigError(f"{group} has an unknown key {full.rsplit('.', 1)[-1]!r}; valid keys: {', '.join(valid)}{hint}")
