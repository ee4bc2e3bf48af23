"""RDO and refusal cones: on a planted linear model the trained direction is the planted one and the
losses fall; a cone's basis has rank k; non-convergence is an error with the numbers; on the tiny model
the fit is a checksummed artifact reused from cache."""

from __future__ import annotations

import math

import pytest
import torch
from planted_model import PlantedLinearModel

from refusal.config import intervention_config, plugin_dirs
from refusal.context import prepare
from refusal.errors import ConfigError, FitError
from refusal.fits import fit_for
from refusal.fitting.rdo import (
    LOSSES,
    RDOConfig,
    accumulate_losses,
    cone_samples,
    direction_loss,
    initial_basis,
    model_targets,
    optimise,
    report_convergence,
    retain_kl,
)
from refusal.interventions import get_intervention

SMALL = ["data.n_train=16", "data.n_val=8", "data.n_test=8", "fit.dim.n_prompts=4", "layer=fixed", "layer.index=1"]


@pytest.fixture(scope="module")
def planted():
    model, r = PlantedLinearModel.planted()
    dim = model.inputs["harmful"].mean(0) - model.inputs["harmless"].mean(0)
    return model, r, dim, model_targets(model, dim, layer=1)


def test_retain_kl_matches_a_hand_computed_case():
    steered, base = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    # p = (1/2, 1/2) steered, q = (1/4, 3/4) unsteered: KL(p || q) = 1/2 log 2 + 1/2 log(2/3), not KL(q || p)
    assert float(retain_kl(steered, base)[0]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-12)
    assert float(retain_kl(base, base)[0]) == pytest.approx(0.0, abs=1e-12)


def test_targets_are_the_models_own_first_tokens_under_the_dim_edits(planted):
    model, _, dim, targets = planted
    assert (targets.addition == 0).float().mean() > 0.5  # adding DiM makes the planted model refuse (token 0)
    assert not (targets.ablation == 0).any()  # ablating it, none of its harmful prompts does
    torch.testing.assert_close(targets.retain_logits, model.run("harmless").logits[0])


def test_rdo_from_a_random_start_recovers_the_planted_direction_and_its_losses_fall(planted):
    model, r, dim, targets = planted
    cfg = RDOConfig(k=1, init="random", steps=100, lr=0.05, seed=4)
    start = initial_basis(model.d_model, cfg, dim, torch.Generator().manual_seed(cfg.seed))[0]
    assert abs(float(start @ r)) < 0.1  # the start is nearly orthogonal to the answer
    result = optimise(model, dim, 1, targets, cfg)
    assert float(result.basis[0] @ r) > 0.9
    first, best = result.history[0], result.history[result.best_step]
    assert best["total"] < 0.5 * first["total"] and best["ablation"] < first["ablation"]
    assert best["addition"] < first["addition"]
    assert result.converged


def test_a_cone_has_rank_k_and_every_sampled_direction_lies_in_it(planted):
    model, r, dim, targets = planted
    result = optimise(model, dim, 1, targets, RDOConfig(k=2, steps=20, lr=0.05, n_sample=4))
    basis = result.basis
    assert basis.shape == (2, model.d_model) and int(torch.linalg.matrix_rank(basis)) == 2
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    assert result.best_loss < result.initial_loss
    samples = cone_samples(2, 64, torch.Generator().manual_seed(0))
    assert bool((samples >= 0).all()) and torch.allclose(samples.norm(dim=1), torch.ones(64))


def test_losses_accumulated_one_direction_and_loss_at_a_time_equal_the_batched_ones_and_their_gradient(planted):
    model, _, dim, targets = planted
    basis = initial_basis(model.d_model, RDOConfig(k=3), dim, torch.Generator().manual_seed(1)).requires_grad_(True)
    mix = torch.cat([torch.eye(3), cone_samples(3, 4, torch.Generator().manual_seed(2))])
    weights = torch.tensor([1 / 3] * 3 + [1 / 4] * 4)
    lambdas = {"ablation": 1.0, "addition": 0.2, "retain": 1.0}
    batched = {name: direction_loss(name, model, mix @ basis, targets, alpha=2.0, layer=1) for name in LOSSES}  # all m at once
    sums = {name: (weights.to(loss) * loss).sum() for name, loss in batched.items()}
    sum(lambdas[name] * part for name, part in sums.items()).backward()
    expected = basis.grad.clone()
    basis.grad = None
    parts = accumulate_losses(model, basis, mix, weights, lambdas, targets, alpha=2.0, layer=1)
    for name, part in sums.items():
        assert parts[name] == pytest.approx(part.item(), rel=1e-5)
    assert float(expected.abs().max()) > 1e-3  # a gradient worth comparing
    torch.testing.assert_close(basis.grad, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown RDO loss 'steer'"):
        direction_loss("steer", model, basis, targets, alpha=2.0, layer=1)


def test_convergence_rule_at_its_boundary(planted):
    model, _, dim, targets = planted
    still = optimise(model, dim, 1, targets, RDOConfig(k=1, steps=3, lr=0.0, min_decrease=0.0))
    assert still.best_loss == pytest.approx(still.initial_loss) and still.converged  # equal counts as converged
    stuck = optimise(model, dim, 1, targets, RDOConfig(k=1, steps=3, lr=0.0, min_decrease=0.01))
    assert not stuck.converged
    with pytest.raises(FitError, match=r"did not converge: lowest total loss [0-9.]+ \(step \d\) is not below .*"
                                       r"ablation [0-9.]+ -> [0-9.]+.*on_unconverged=warn"):
        report_convergence(stuck, RDOConfig(min_decrease=0.01))
    with pytest.warns(UserWarning, match="did not converge"):
        report_convergence(stuck, RDOConfig(min_decrease=0.01, on_unconverged="warn"))


@pytest.mark.parametrize(("override", "message"), [
    ({"k": 0}, r"intervention.k=0 must be an integer >= 1"),
    ({"lr": float("nan")}, r"intervention.lr=nan must be a finite number >= 0"),
    ({"min_decrease": 1.0}, r"min_decrease=1.0 must be < 1"),
    ({"init": "pca"}, r"intervention.init='pca' must be one of"),
    ({"on_unconverged": "ignore"}, r"on_unconverged='ignore' must be one of"),
])
def test_bad_rdo_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        RDOConfig(**override)


def test_rdo_on_the_tiny_model_is_an_artifact_reused_from_cache(compose, caplog):
    overrides = ["intervention=rdo_ablation", "intervention.k=2", "intervention.steps=3", "intervention.n_prompts=4",
                 "intervention.n_sample=2", "intervention.on_unconverged=warn", *SMALL]
    cfg = compose(*overrides)
    ctx = prepare(cfg)
    cls = get_intervention("rdo_ablation", plugin_dirs(cfg))
    icfg = intervention_config(cfg)
    with caplog.at_level("INFO", logger="refusal.fitting.rdo"):  # a long fit shows each step
        fitted = fit_for(ctx, cls, icfg)
    fit = fitted.extra["rdo_ablation"]
    assert fit.basis.shape == (2, ctx.bundle.d_model) and len(fit.history) == 3
    assert f"RDO (k=2) step 3/3: total {fit.history[2]['total']:.4f}" in caplog.text
    stems = sorted(ctx.artifact_dir.glob("rdo_L1_P-1_k2-*.json"))
    assert len(stems) == 1
    intervention = cls(icfg, fitted)
    assert intervention.params()["best_step"] == fit.best_step
    x = ctx.activations("harmful_val", layer=1, position=-1)
    assert float((intervention.transform(x) @ fit.basis.T).abs().max()) < 1e-4 * float(x.abs().max())  # the cone is gone
    with caplog.at_level("INFO", logger="refusal.fits"):  # fits.fit_rdo caches the fit
        again = fit_for(ctx, cls, icfg).extra["rdo_ablation"]
    assert "reusing RDO artifact" in caplog.text
    torch.testing.assert_close(again.basis, fit.basis, rtol=0, atol=0)
    assert again.history == fit.history
    # stricter settings are another artifact: trained again, and its non-convergence is an error with the numbers
    strict = compose(*overrides[:-len(SMALL)], "intervention.on_unconverged=error", "intervention.min_decrease=0.99", *SMALL)
    with pytest.raises(FitError, match=r"RDO \(k=2\) did not converge"):
        fit_for(ctx, cls, intervention_config(strict))


class StopAfter:
    """An in-memory progress store that stops the fit (KeyboardInterrupt) once it has saved step ``n``."""

    def __init__(self, n: int | None):
        self.n, self.state = n, None

    def load(self):
        return self.state

    def save(self, state):
        self.state = state
        if len(state.history) == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop", [1, 7, 11, 12])  # lr is cut by steps 7 and 12 (saved after the cut), it stops at 15
def test_a_stopped_fit_resumed_from_its_last_step_equals_the_uninterrupted_one(planted, stop):
    """A cone (its samples draw from the generator) with a patience schedule that cuts lr twice and stops early:
    resumed after any step, the basis, history and schedule are exactly those of the fit that never stopped."""
    model, _, dim, targets = planted
    cfg = RDOConfig(k=2, steps=30, lr=0.5, n_sample=3, patience=2, n_lr_reduce=2, seed=3, on_unconverged="warn")
    whole = optimise(model, dim, 1, targets, cfg)
    assert {h["lr"] for h in whole.history} == {0.5, 0.05, 0.005} and len(whole.history) < cfg.steps  # both cuts, early stop
    progress = StopAfter(stop)
    with pytest.raises(KeyboardInterrupt):
        optimise(model, dim, 1, targets, cfg, progress)
    assert len(progress.state.history) == stop
    progress.n = None
    resumed = optimise(model, dim, 1, targets, cfg, progress)
    assert resumed.history == whole.history and resumed.best_step == whole.best_step
    torch.testing.assert_close(resumed.basis, whole.basis, rtol=0, atol=0)


def test_a_stopped_fit_on_the_tiny_model_resumes_from_its_step_artifact(compose, caplog, monkeypatch):
    """Through fits.fit_rdo with real artifacts: stopped after step 2 of 4, the next run resumes there and gives the
    uninterrupted fit; the step artifact is removed once the fit's own is saved."""
    from refusal.fits import RDOStepArtifact

    cfg = compose("intervention=rdo_ablation", "intervention.k=2", "intervention.steps=4", "intervention.n_prompts=4",
                  "intervention.n_sample=2", "intervention.on_unconverged=warn", "intervention.seed=5", *SMALL)
    ctx, cls, icfg = prepare(cfg), get_intervention("rdo_ablation", plugin_dirs(cfg)), intervention_config(cfg)
    save = RDOStepArtifact.save

    def stop_after_two(self, state):
        save(self, state)
        if len(state.history) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RDOStepArtifact, "save", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        fit_for(ctx, cls, icfg)
    assert len(list(ctx.artifact_dir.glob("rdo_L1_P-1_k2-*-progress.json"))) == 1
    monkeypatch.setattr(RDOStepArtifact, "save", save)
    with caplog.at_level("INFO", logger="refusal.fitting.rdo"):
        resumed = fit_for(ctx, cls, icfg).extra["rdo_ablation"]
    assert "RDO (k=2) resumed after step 2/4" in caplog.text and "step 1/4" not in caplog.text
    assert not list(ctx.artifact_dir.glob("rdo_*-progress*"))
    for path in ctx.artifact_dir.glob("rdo_L1_P-1_k2-*"):
        path.unlink()
    whole = fit_for(ctx, cls, icfg).extra["rdo_ablation"]
    assert resumed.history == whole.history
    torch.testing.assert_close(resumed.basis, whole.basis, rtol=0, atol=0)
