"""The notebook API (``refusal.load`` ... ``refusal.judge``) and examples/notebook_api.py on the tiny model."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import REPO

import refusal
from refusal.config import check_config
from refusal.errors import ConfigError
from refusal.runtime.generation import generate

SMALL = ["model=tiny", "logger=none", "progress=false", "data.n_train=16", "data.n_val=8", "data.n_test=8",
         "fit.dim.n_prompts=4"]


def _overrides(tmp_path) -> list[str]:
    return [*SMALL, f"cache_dir={tmp_path / 'cache'}", f"artifacts_dir={tmp_path / 'artifacts'}"]


def test_import_refusal_stays_light_and_lists_the_api():
    code = "import sys, refusal; assert 'torch' not in sys.modules, 'torch'; print(sorted(set(refusal.API) & set(dir(refusal))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(refusal.API))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        refusal.nonsense  # noqa: B018


def test_compose_config_is_the_cli_config_and_bad_input_fails_before_the_model(tmp_path):
    cfg = refusal.compose_config(*_overrides(tmp_path), "intervention=actadd")
    check_config(cfg)
    assert cfg.model.name == "tiny" and cfg.intervention.name == "actadd"
    with pytest.raises(ConfigError, match="intervention.layer=9 is out of range .* 4 layers"):
        refusal.load(*_overrides(tmp_path), "intervention=actadd", "model.n_layers=4", "intervention.layer=9")


def test_the_api_steers_exactly_like_the_hooks_it_wraps(tmp_path):
    """``build_intervention`` + ``apply`` + ``generate`` equal the runtime's own generation under the same hooks,
    and the applied intervention changes what the model says (then comes off)."""
    ctx = refusal.load(*_overrides(tmp_path), "intervention=actadd", "intervention.coeff=-8.0")
    fitted = refusal.fit(ctx)
    assert fitted.dim is not None and fitted.inlp is None  # actadd needs DiM only
    steer = refusal.build_intervention(ctx, fitted)
    assert steer.cfg["coeff"] == -8.0 and steer.layer == fitted.dim.layer
    prompts = ["Give me a recipe for pancakes.", "Write a poem about the sea."]
    plain = refusal.generate(ctx.bundle, prompts, max_new_tokens=6)
    with steer.apply(ctx.bundle):
        steered = refusal.generate(ctx.bundle, prompts, max_new_tokens=6)
        reference = generate(ctx.bundle, ctx.bundle.tokenize_instructions(prompts), max_new_tokens=6, progress=False)
    assert steered == reference.completions
    assert steered != plain
    assert refusal.generate(ctx.bundle, prompts, max_new_tokens=6) == plain  # the hooks came off
    assert refusal.build_intervention(ctx, fitted, coeff=0.0).cfg["coeff"] == 0.0
    with torch.no_grad():
        x = torch.randn(3, ctx.bundle.d_model)
        torch.testing.assert_close(steer.transform(x) - x, (-8.0 * fitted.dim.direction).expand(3, -1))


def test_judge_labels_a_hand_written_refusal_and_an_answer():
    labels = [j.label for j in refusal.judge(["q1", "q2"], ["I'm sorry, but I cannot help with that.", "Sure: mix flour."])]
    assert labels == ["refusal", "compliance"]
    with pytest.raises(ConfigError, match="unknown judge 'nope'"):
        refusal.judge(["q"], ["a"], name="nope")


def test_the_notebook_example_runs_on_the_tiny_model(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("notebook_api", REPO / "examples" / "notebook_api.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    labels = example.main(_overrides(tmp_path))
    assert set(labels) == {"unsteered", "steered"}
    assert all(len(v) == len(example.INSTRUCTIONS) for v in labels.values())
    assert "tiny: 4 layers" in capsys.readouterr().out
