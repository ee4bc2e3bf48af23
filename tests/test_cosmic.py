"""COSMIC selection: the read layers are those whose class means are least alike, the planted candidate
wins on a planted model, and layer=cosmic runs end to end on the tiny model."""

from __future__ import annotations

import pytest
import torch
from planted_model import PlantedLinearModel

from refusal.artifacts import load_artifact
from refusal.context import prepare
from refusal.errors import ConfigError
from refusal.fits import fit_dim
from refusal.fitting.cosmic import CosmicConfig, low_similarity_layers, select_cosmic
from refusal.fitting.dim import eligible_layers


def test_read_layers_are_the_least_alike_and_at_least_one():
    harmless = torch.eye(5)
    harmful = harmless.clone()
    harmful[3] = torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0])  # cos -1: least alike
    harmful[1] = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])  # cos 0.71: next
    assert low_similarity_layers(harmful, harmless, 0.1) == [3]  # int(0.5) = 0 layers -> still one
    assert low_similarity_layers(harmful, harmless, 0.4) == [1, 3]
    assert low_similarity_layers(harmful, harmless, 1.0) == [0, 1, 2, 3, 4]


def test_cosmic_picks_the_planted_candidate():
    model, r = PlantedLinearModel.planted(n_layers=5, offset=6.0)
    g = torch.Generator().manual_seed(0)
    n_pos, planted_layer = 2, 2
    # every candidate but one is r* blurred by a large random part; (layer 2, position -1) is r* itself
    candidates = 4.0 * r + 3.0 * torch.randn(model.n_layers, n_pos, model.d_model, generator=g)
    candidates[planted_layer, -1] = 4.0 * r
    plain_harm = model.run("harmful", read=range(model.n_layers)).residuals[0].mean(0)
    plain_safe = model.run("harmless", read=range(model.n_layers)).residuals[0].mean(0)
    read = low_similarity_layers(plain_harm, plain_safe, 0.4)
    result = select_cosmic(candidates, model, read, CosmicConfig(max_kl=10.0, prune_last_fraction=0.2), n_prompts=24)
    assert (result.layer, result.position) == (planted_layer, -1)
    total = result.refusal_similarity + result.steering_similarity
    assert float(total[planted_layer, -1]) == pytest.approx(float(total.nan_to_num(-9).max()))
    assert bool(total[eligible_layers(5, 0.2)].isfinite().all()) and bool(total[4].isnan().all())  # layer 4 pruned
    # the winner moves the harmless logits least; a KL bound below even its KL keeps no candidate: the
    # fallback takes all of them (the same winner) and says so
    kl = float(result.kl[planted_layer, -1])
    assert kl == pytest.approx(float(result.kl.nan_to_num(9).min()))
    with pytest.warns(UserWarning, match="no candidate kept the harmless next-token KL"):
        tight = select_cosmic(candidates, model, read, CosmicConfig(max_kl=kl / 2), n_prompts=24)
    assert (tight.layer, tight.position) == (planted_layer, -1) and tight.notes

class StopAfter:
    """An in-memory score store that stops the selection (KeyboardInterrupt) at its ``n``-th save."""

    def __init__(self, n: int | None):
        self.n, self.saves, self.tables = n, 0, None

    def load(self):
        return None if self.tables is None else {k: v.clone() for k, v in self.tables.items()}

    def save(self, tables):
        self.saves += 1
        self.tables = {k: v.clone() for k, v in tables.items()}
        if self.saves == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop", [1, 3, 5])  # mid-ablation (2 candidates a pass, 8 candidates), the first and last addition
def test_a_stopped_selection_resumes_with_the_scores_it_kept(stop):
    model, r = PlantedLinearModel.planted(n_layers=5, offset=6.0)
    candidates = 4.0 * r + 3.0 * torch.randn(model.n_layers, 2, model.d_model, generator=torch.Generator().manual_seed(1))
    cfg, read = CosmicConfig(max_kl=10.0, batch_size=48), [1, 2]
    calls = []
    run = model.run
    model.run = lambda *args, **kwargs: calls.append(kwargs) or run(*args, **kwargs)
    whole = select_cosmic(candidates, model, read, cfg, n_prompts=24)
    passes = len(calls)
    assert passes == 2 + 2 * 4 + 4  # references, 4 ablation passes of 2 candidates (2 classes), 4 layers' additions
    progress = StopAfter(stop)
    with pytest.raises(KeyboardInterrupt):
        select_cosmic(candidates, model, read, cfg, n_prompts=24, progress=progress)
    progress.n, calls[:] = None, []
    resumed = select_cosmic(candidates, model, read, cfg, n_prompts=24, progress=progress)
    assert len(calls) == passes - 2 * min(stop, 4) - max(0, stop - 4)  # nothing scored twice
    assert (resumed.layer, resumed.position) == (whole.layer, whole.position)
    for name in ("refusal_similarity", "steering_similarity", "kl"):
        torch.testing.assert_close(getattr(resumed, name), getattr(whole, name), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("override", "message"), [
    ("layer.fraction=0", r"^layer.fraction=0 must be within \(0, 1\] \(the share of layers read"),
    ("layer.fraction=1", None),
    ("layer.prune_last_fraction=1.0", r"^layer.prune_last_fraction=1 must be within \[0, 1\)"),
    ("layer.prune_last_fraction=0", None),
    ("layer.n_prompts=0", r"^layer.n_prompts=0 must be an integer >= 1"),
    ("layer.n_prompts=1", None),
    ("+layer.fractoin=0.2", r"^layer has an unknown key 'fractoin'; .*did you mean layer.fraction\?$"),
])
def test_bad_cosmic_settings_fail_before_the_model_loads(compose, override, message):
    from refusal.config import check_config

    if message is None:  # the range's own end
        check_config(compose("layer=cosmic", override))
        return
    with pytest.raises(ConfigError, match=message):
        check_config(compose("layer=cosmic", override))


def test_layer_cosmic_on_the_tiny_model(compose):
    ctx = prepare(compose("layer=cosmic", "layer.fraction=0.5", "layer.n_prompts=4", "data.n_train=16", "data.n_val=8",
                          "data.n_test=8"))
    dim = fit_dim(ctx)
    assert dim.layer in eligible_layers(ctx.bundle.n_layers, 0.2) and -dim.position <= len(ctx.bundle.post_instruction_ids)
    (stem,) = [p.with_suffix("") for p in ctx.artifact_dir.glob("dim_cosmic-*.json")]
    tensors, meta = load_artifact(stem)
    assert len(meta["read_layers"]) == 2 and meta["winner"]["kl"] <= 0.1 or meta["notes"]
    torch.testing.assert_close(tensors["direction"], tensors["candidates"][dim.layer, dim.position])
    total = tensors["refusal_similarity"] + tensors["steering_similarity"]
    winner = total[dim.layer, dim.position]
    allowed = total[(tensors["kl"] <= 0.1) & total.isfinite()]
    assert float(winner) == pytest.approx(float(allowed.max() if len(allowed) else total.nan_to_num(-9).max()))
    assert fit_dim(ctx).layer == dim.layer  # reused from the artifact
    assert not list(ctx.artifact_dir.glob("dim_cosmic-*-progress*"))  # a finished selection keeps no step artifact


def test_layer_cosmic_stopped_on_the_tiny_model_resumes_from_its_step_artifact(compose, caplog, monkeypatch):
    from refusal.fits import CosmicStepArtifact

    overrides = ("layer=cosmic", "layer.fraction=0.5", "layer.n_prompts=4", "layer.batch_size=4", "data.n_train=16",
                 "data.n_val=8", "data.n_test=8")
    ctx = prepare(compose(*overrides))
    save = CosmicStepArtifact.save

    def stop_after_one(self, tables):
        save(self, tables)
        raise KeyboardInterrupt

    monkeypatch.setattr(CosmicStepArtifact, "save", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        fit_dim(ctx)
    assert len(list(ctx.artifact_dir.glob("dim_cosmic-*-progress.json"))) == 1
    monkeypatch.setattr(CosmicStepArtifact, "save", save)
    with caplog.at_level("INFO", logger="refusal.fitting.cosmic"):
        resumed = fit_dim(ctx)
    assert "COSMIC resumed with 1/" in caplog.text
    assert not list(ctx.artifact_dir.glob("dim_cosmic-*-progress*"))
    (stem,) = [p.with_suffix("") for p in ctx.artifact_dir.glob("dim_cosmic-*.json")]
    kept, _ = load_artifact(stem)
    for path in ctx.artifact_dir.glob("dim_cosmic-*"):
        path.unlink()
    whole = fit_dim(ctx)
    assert (resumed.layer, resumed.position) == (whole.layer, whole.position)
    fresh, _ = load_artifact(stem)
    for name in ("refusal_similarity", "steering_similarity", "kl"):
        torch.testing.assert_close(kept[name], fresh[name], equal_nan=True)
