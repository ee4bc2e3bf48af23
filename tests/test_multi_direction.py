"""Multi-direction ablation: the nested basis (DiM first, then the leading components of the per-prompt
differences) is orthonormal, and the ablation removes every basis component everywhere."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from refusal.config import intervention_config, plugin_dirs
from refusal.context import prepare
from refusal.errors import FitError
from refusal.fits import fit_for
from refusal.fitting.subspace import difference_components, orthonormal_basis
from refusal.interventions import get_intervention
from refusal.runtime.hooks import HookSpec, hooked
from refusal.runtime.prefix import forward

SMALL = ["data.n_train=16", "data.n_val=8", "data.n_test=8", "fit.dim.n_prompts=4", "layer=fixed", "layer.index=1"]


def test_basis_is_dim_then_the_planted_second_direction():
    g = torch.Generator().manual_seed(0)
    d, n = 12, 200
    q, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
    r, second, third = q.T  # harmful = harmless mean + 4 r + spread 3 along `second` + 0.5 along `third`
    coeff = torch.randn(n, 2, generator=g)
    coeff = coeff - coeff.mean(0)
    harmful = 4 * r + 3 * coeff[:, :1] * second + 0.5 * coeff[:, 1:] * third
    basis, explained = difference_components(harmful, torch.zeros(d), k=3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    assert float(basis[0] @ r) > 0.9999  # DiM's direction, sign kept
    assert abs(float(basis[1] @ second)) > 0.999 and abs(float(basis[2] @ third)) > 0.999
    # shares of the differences' squared length: 16 : 9·var : 0.25·var, summing to 1 with nothing left over
    assert float(explained.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(explained[0]) > float(explained[1]) > float(explained[2]) > 0


def test_rank_below_k_is_an_error_with_the_numbers():
    harmful = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # every difference is DiM's: nothing beyond it
    with pytest.raises(FitError, match=r"k=2 needs 1 directions beyond DiM's, but the per-prompt differences have only 0"):
        difference_components(harmful, torch.zeros(3), k=2)
    with pytest.raises(FitError, match=r"span only rank 1 .*\[1.0, 0.0\]"):
        orthonormal_basis(torch.tensor([[1.0, 1.0], [2.0, 2.0]]), "planted", "lower k")


def test_ablation_on_the_tiny_model_removes_every_basis_component(compose):
    cfg = compose("intervention=multi_ablation", "intervention.k=3", *SMALL)
    ctx = prepare(cfg)
    cls = get_intervention("multi_ablation", plugin_dirs(cfg))
    fitted = fit_for(ctx, cls, intervention_config(cfg))
    intervention = cls(intervention_config(cfg), fitted)
    Q = intervention.basis
    torch.testing.assert_close(Q @ Q.T, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(Q[0], fitted.dim.unit, atol=1e-5, rtol=0)  # nested on DiM: k=1 is DiM ablation
    assert intervention.params()["explained"][0] > 0

    bundle, seen = ctx.bundle, []
    layout = bundle.layout
    watch = [HookSpec(b, lambda x: seen.append(x) or x, "pre") for b in layout.blocks]
    watch += [HookSpec(layout.final_norm, lambda x: seen.append(x) or x, "pre")]
    rows = ctx.tokens("harmful_test")[:3]
    with torch.no_grad(), intervention.apply(bundle), hooked(watch):  # watchers run after the edits
        forward(bundle, rows)
    components = torch.stack([(x @ Q.T).abs().max() for x in seen])
    scale = torch.stack([x.abs().max() for x in seen])
    assert len(seen) == bundle.n_layers + 1 and bool((components <= 1e-4 * scale).all()), components
    seen.clear()
    with torch.no_grad(), hooked(watch):  # unsteered: the components are there to remove
        forward(bundle, rows)
    assert float(torch.stack([(x @ Q.T).abs().max() for x in seen[1:]]).min()) > 1e-3


def test_without_dim_ablates_only_the_directions_beyond_dims(compose):
    """without_dim=true: the second direction alone, DiM's kept (the floor DiM ablation leaves hides what it adds)."""
    cfg = compose("intervention=multi_ablation", "intervention.k=2", "intervention.without_dim=true", *SMALL)
    ctx = prepare(cfg)
    cls = get_intervention("multi_ablation", plugin_dirs(cfg))
    fitted = fit_for(ctx, cls, intervention_config(cfg))
    intervention = cls(intervention_config(cfg), fitted)
    torch.testing.assert_close(intervention.basis, fitted.extra["multi_ablation"]["basis"][1:])
    bundle = ctx.bundle
    seen = []
    watch = [HookSpec(bundle.layout.final_norm, lambda x: seen.append(x) or x, "pre")]
    with torch.no_grad(), intervention.apply(bundle), hooked(watch):
        forward(bundle, ctx.tokens("harmful_test")[:3])
    (x,) = seen
    assert float((x @ intervention.basis.T).abs().max()) <= 1e-4 * float(x.abs().max())  # the second direction: gone
    assert float((x @ fitted.dim.unit).abs().max()) > 1e-3  # DiM's: kept


@pytest.mark.parametrize(("overrides", "message"), [
    ({"k": 1, "without_dim": True}, r"without_dim=true keeps DiM's direction .* needs intervention.k >= 2 \(got k=1\)"),
    ({"k": 2, "without_dim": "yes"}, r"intervention.without_dim='yes' must be true or false"),
])
def test_a_bad_without_dim_fails_before_the_model_loads(overrides, message):
    from refusal.errors import ConfigError

    cls = get_intervention("multi_ablation", [str(REPO / "plugins")])
    with pytest.raises(ConfigError, match=message):
        cls.check_params(overrides, n_layers=None)
    cls.check_params({"k": 2, "without_dim": None}, n_layers=None)  # null: the default, false


@pytest.mark.parametrize("name", ["multi_ablation", "rdo_ablation"])
def test_the_subspace_ablations_export_weights_whose_logits_equal_the_hooked_models(tiny_tied_bundle, prompts, tmp_path,
                                                                                     name):
    """x − QᵀQx at every write, baked in row by row (float64, stored float32): the reloaded checkpoint's logits equal the
    hooks' to 1e-4, the tied unembedding is untied and kept, and the edit is far larger than that gap."""
    from types import SimpleNamespace

    from test_interventions import forward
    from test_projected_ablation import fitted_for, hooked_and_exported

    bundle = tiny_tied_bundle
    fitted = fitted_for(bundle, 4)
    rows = torch.cat([fitted.dim.unit[None], torch.randn(2, bundle.d_model, generator=torch.Generator().manual_seed(2))])
    basis = torch.linalg.qr(rows.T)[0].T  # orthonormal, DiM's direction first as both fits start
    fitted.extra[name] = {"basis": basis, "explained": torch.ones(3) / 3} if name == "multi_ablation" else \
        SimpleNamespace(basis=basis)
    cls = get_intervention(name, [str(REPO / "plugins")])
    intervention = cls({**cls.defaults, "name": name, "k": 3}, fitted)
    hooked, exported, reloaded = hooked_and_exported(bundle, intervention, prompts, tmp_path / name)
    with torch.no_grad():
        plain = forward(bundle, bundle.tokenize_instructions(prompts))
    assert float((exported - hooked).abs().max()) <= 1e-4
    assert float((hooked - plain).abs().max()) > 1e-2
    torch.testing.assert_close(reloaded.lm_head.weight, bundle.model.lm_head.weight)
    writer = reloaded.model.layers[1].mlp.down_proj.weight.detach().double()  # a write's output has nothing in the span
    assert float((basis.double() @ writer).abs().max()) < 1e-5


def test_a_basis_that_is_not_orthonormal_is_not_exported(tiny_bundle, tmp_path):
    from refusal.errors import ConfigError
    from refusal.interventions.export import export_subspace

    skewed = torch.stack([torch.eye(tiny_bundle.d_model)[0], torch.eye(tiny_bundle.d_model)[0] + torch.eye(tiny_bundle.d_model)[1]])
    with pytest.raises(ConfigError, match=r"the 2 directions to export are not orthonormal \(Gram matrix off the identity by 1"):
        export_subspace(tiny_bundle, skewed, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_evaluate_exports_the_multi_direction_ablation(compose, prompts, tmp_path):
    from test_projected_ablation import hooked_and_exported
    from transformers import AutoModelForCausalLM

    from refusal.evaluation import run_evaluation

    cfg = compose("intervention=multi_ablation", "intervention.k=2", "intervention.export=true", "eval.max_new_tokens=2",
                  "geometry.enabled=false", *SMALL)
    results = run_evaluation(cfg, tmp_path / "run")
    ctx = prepare(cfg)
    cls = get_intervention("multi_ablation", plugin_dirs(cfg))
    intervention = cls(intervention_config(cfg), fit_for(ctx, cls, intervention_config(cfg)))
    hooked, _, _ = hooked_and_exported(ctx.bundle, intervention, prompts, tmp_path / "again")
    reloaded = AutoModelForCausalLM.from_pretrained(results["exported_checkpoint"]).eval()
    batch = ctx.bundle.pad(ctx.bundle.tokenize_instructions(prompts))
    with torch.no_grad():
        saved = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    assert float((saved - hooked).abs().max()) <= 1e-4
