"""The config schemas (refusal.schema) at their boundaries, on the real Hydra compose of conf/: every bounded
field just inside and just outside its range, a wrong type at compose time, an unknown key where a schema is
closed, the open mappings kept open, and every fixed group's yaml starting from its schema."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from conftest import REPO
from omegaconf import ValidationError

from refusal import schema
from refusal.config import check_config
from refusal.errors import ConfigError

#: where each schema's node sits in the composed config (the judge: one configured entry of its kind)
PATHS = {schema.ModelSchema: "model", schema.DataSchema: "data", schema.FitSchema: "fit", schema.DimSchema: "fit.dim",
         schema.InlpSchema: "fit.inlp", schema.EvalSchema: "eval", schema.CapabilitySchema: "eval.capability",
         schema.QualityJudgeSchema: "eval.quality_judge", schema.GeometrySchema: "geometry",
         schema.ModelJudgeSchema: "judge.model", schema.ConfigSchema: "", schema.LoggerSchema: "logger"}
#: the layer schemas, one per mode: (schema, the override choosing its mode)
LAYERS = {schema.FixedLayerSchema: "layer=fixed", schema.RelativeLayerSchema: "layer=relative",
          schema.CosmicLayerSchema: "layer=cosmic"}


def bounded() -> list[tuple[str, schema.Bound]]:
    """(config key, bound) of every field with a numeric range, from the schemas themselves."""
    out = []
    for cls, path in PATHS.items():
        for f in dataclasses.fields(cls):
            bound = f.metadata.get("bound")
            if bound is not None and bound.low is not None:
                out.append((f"{path}.{f.name}".lstrip("."), bound))
    for cls, mode in LAYERS.items():
        out += [(f"{mode}:layer.{f.name}", f.metadata["bound"]) for f in dataclasses.fields(cls) if "bound" in f.metadata]
    return out


def test_every_schema_with_a_group_is_walked_here():
    stored = {node for nodes in schema.SCHEMAS.values() for node in nodes.values() if isinstance(node, type)}
    nested = {schema.DimSchema, schema.InlpSchema, schema.CapabilitySchema, schema.QualityJudgeSchema}
    layers = set(schema.SCHEMAS["layer"].values())
    assert layers == set(LAYERS) | {schema.LayerSchema}  # auto has no setting with a range
    assert stored - {schema.FilesDataSchema, schema.SplitsDataSchema, schema.HubDataSchema} - layers | nested <= set(PATHS)
    assert len(bounded()) >= 12  # batch sizes, counts, split sizes, max_kl, epsilon, prune_last_fraction, ...


@pytest.mark.parametrize(("key", "bound"), bounded(), ids=[k for k, _ in bounded()])
def test_each_range_accepts_its_end_and_refuses_just_past_it(compose, key, bound):
    """An integer's least value (1 for a count, 0 for shortlist) passes and the one below fails; a float's closed
    end passes, its open end fails; each error names the key, the range and an example."""
    extra = ["eval.judges=[substring,model]"] if key.startswith("judge.") else ["layer.index=1"] if "fixed" in key else []
    if key == "eval.generate_new_tokens":  # at least max_new_tokens too (a rule over both, tests/test_bad_input.py)
        extra.append("eval.max_new_tokens=1")
    if ":" in key:  # a layer mode's setting: choose the mode first
        mode, key = key.split(":")
        extra.append(mode)
    is_int = isinstance(bound.example, int)
    if bound.low is None:  # an upper bound only (layer.position <= -1)
        inside, outside = int(bound.high), int(bound.high) + 1
    else:
        inside = (int(bound.low) if is_int else bound.low) if not bound.low_open else bound.high
        outside = (inside - 1 if is_int else (bound.high if bound.high_open else bound.low - 0.5)) if not bound.low_open \
            else bound.low
    check_config(compose(*extra, f"{key}={inside}"))
    with pytest.raises(ConfigError, match=rf"^{key}={outside:g} must be (an integer [<>]=|within|>=) .*, e.g. {key}="):
        check_config(compose(*extra, f"{key}={outside}"))


@pytest.mark.parametrize(("override", "message"), [
    ("eval.batch_size=abc", "^eval.batch_size='abc' must be an integer, e.g. eval.batch_size=64$"),
    ("data.n_test=1.5", "^data.n_test=1.5 must be an integer$"),
    ("model.batch_size=[1]", r"^model.batch_size=\[1\] must be an integer, e.g. model.batch_size=32$"),
    ("fit.dim.max_kl=x", "^fit.dim.max_kl='x' must be a number, e.g. fit.dim.max_kl=0.1$"),
    ("geometry.enabled=maybe", "^geometry.enabled='maybe' must be true or false, e.g. geometry.enabled=true$"),
    ("eval.constraints=x", r"^eval.constraints='x' must be a list, e.g. eval.constraints=\[x\]$"),
    ("judge.model.threshold=high", "^judge.model.threshold='high' must be a number$"),
])
def test_a_wrong_type_fails_at_compose_time_with_omegaconfs_validation_error(compose, override, message):
    with pytest.raises(ConfigError, match=message) as info:
        compose(override)
    cause = info.value.__cause__
    while cause is not None and not isinstance(cause, ValidationError):
        cause = cause.__cause__
    assert isinstance(cause, ValidationError)


@pytest.mark.parametrize(("override", "message"), [
    ("+eval.nope=1", r"^eval has an unknown key 'nope'; valid keys: batch_size, capability, "),
    ("+model.batchsize=4", r"^model has an unknown key 'batchsize'; .*did you mean model.batch_size\?$"),
    ("+data.n_tests=4", r"^data has an unknown key 'n_tests'; .*did you mean data.n_test\?$"),
    ("+geometry.downstrem=[1]", r"^geometry has an unknown key 'downstrem'; valid keys: downstream, enabled; "),
    ("+eval.capability.task=[mmlu]", r"^eval.capability has an unknown key 'task'; .*did you mean eval.capability.tasks\?$"),
    ("+judge.model.treshold=1", r"^judge.model has an unknown key 'treshold'; .*did you mean judge.model.threshold\?$"),
])
def test_a_key_added_where_the_schema_is_closed_names_the_valid_ones(compose, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose(override))


def test_a_key_the_schema_lacks_without_plus_is_hydras_error_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not override 'eval.nope'"):
        schema.compose(REPO / "conf", ["model=tiny", "eval.nope=1"])


def test_the_open_parts_stay_open_and_the_studys_overrides_compose(compose):
    """User-named test sets, a judge model given as a mapping and the study's overrides."""
    cfg = compose("+eval.test_sets.strongreject={source: pypi, benchmark: strongreject, n: null}",
                  "eval.test_sets.overrefusal=null", "fit.inlp.positions=selected", "model.matmul=bfloat16",
                  "eval.batch_size=128", "+eval.test_sets.mine={source: file, path: x.txt, label: harmful, extra: 1}",
                  "eval.quality_judge.model={name: m, source: hub, hub_id: a/b}")
    check_config(cfg)
    assert cfg.eval.test_sets.overrefusal is None and cfg.eval.test_sets.mine.extra == 1
    assert cfg.eval.test_sets.strongreject.n is None and cfg.eval.batch_size == 128
    assert compose("eval=trial").eval.test_sets is None and compose("eval=trial").eval.max_new_tokens == 32


def test_a_judge_added_on_the_command_line_is_typed_by_its_type(compose):
    base = "+judge.mine={type: model, model: qwen15, batch_size: %s}"
    with pytest.raises(ConfigError, match=r"^judge.mine.batch_size=0 must be an integer >= 1 \(rows per judge"):
        check_config(compose(base % 0, "eval.judges=[substring]"))
    with pytest.raises(ConfigError, match="^judge.mine.batch_size='many' must be an integer, e.g. judge.mine.batch_size=8$"):
        check_config(compose(base % "many", "eval.judges=[substring]"))


def test_a_non_finite_number_is_refused_anywhere_a_schema_types_it(compose):
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(ConfigError, match=f"^fit.dim.min_induce={float(value)} must be a finite number$"):
            check_config(compose(f"fit.dim.min_induce={value}"))
    assert math.isfinite(compose().fit.dim.min_induce)


@pytest.mark.parametrize("group", ["model", "data", "layer", "fit", "eval", "geometry", "judge"])
def test_every_yaml_of_a_fixed_group_starts_from_its_schema(group):
    """A new yaml in a fixed group without its schema would compose untyped: each starts its defaults list with
    one of the schemas stored for its group (conf/eval/trial.yaml through eval/default)."""
    stored = set(schema.SCHEMAS[group])
    for path in sorted((REPO / "conf" / group).glob("*.yaml")):
        first = yaml.safe_load(path.read_text())["defaults"][0]
        assert first in stored or (path.parent / f"{first}.yaml").is_file(), path.name


def test_bound_messages_at_the_edges():
    count = schema.Bound(low=1, why="rows", example=8)
    assert count.allows(1) and not count.allows(0)
    assert count.message("x.batch_size", 0) == "x.batch_size=0 must be an integer >= 1 (rows), e.g. x.batch_size=8"
    assert schema.Bound(high=-1, example=-1).message("p", 0) == "p=0 must be an integer <= -1, e.g. p=-1"
    share = schema.Bound(low=0, high=1, low_open=True, example=0.1)
    assert share.allows(1.0) and share.allows(1e-9) and not share.allows(0.0)
    assert share.message("f", 0.0) == "f=0 must be within (0, 1], e.g. f=0.1"
    half = schema.Bound(low=0, high=0.5, high_open=True, example=0.02)
    assert half.allows(0.0) and half.allows(0.4999) and not half.allows(0.5) and not half.allows(-1e-9)
    assert half.message("e", 0.5) == "e=0.5 must be within [0, 0.5), e.g. e=0.02"
    pick = schema.Bound(choices=("all", "last"))
    assert pick.allows("all") and not pick.allows("first") and pick.message("p", "x") == "p='x' must be 'all' or 'last'"
    strict = schema.Bound(strict_bool=True)
    assert strict.allows(False) and not strict.allows("yes") and not strict.allows(1)


def test_the_check_reads_no_untyped_interpolation_so_the_default_logger_checks_outside_hydra(tmp_path):
    """logger=wandb (the default) has dir: ${hydra:runtime.output_dir}, which resolves only in a Hydra run: the
    notebook API checks such a config too, so the walk leaves untyped interpolations alone."""
    cfg = schema.compose(REPO / "conf", ["model=tiny", f"cache_dir={tmp_path}"])
    assert cfg.logger.name == "wandb"
    check_config(cfg)


def test_a_bad_logger_choice_fails_where_the_tracker_is_made_before_anything_else(compose, tmp_path):
    from refusal.tracking import make_tracker

    with pytest.raises(ConfigError, match=r"^logger.mode='loud' must be one of 'offline', 'online', 'disabled'"):
        make_tracker(compose("logger=wandb", "logger.mode=loud"), tmp_path)
    with pytest.raises(ConfigError, match="logger has an unknown key 'projct'; .*did you mean logger.project"):
        make_tracker(compose("logger=csv", "+logger.projct=x"), tmp_path)
    with pytest.raises(ConfigError, match="logger.tags"):  # a wrong type fails when Hydra composes
        compose("logger=wandb", "logger.tags=7")
    assert make_tracker(compose("logger=none"), tmp_path) is None
