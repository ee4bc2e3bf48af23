"""Projected, norm-preserving and heretic-weighted ablation: maths against hand-computed cases, weights = hooks."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import REPO, random_unit
from test_interventions import forward
from transformers import AutoModelForCausalLM

from refusal.config import check_config
from refusal.errors import ConfigError
from refusal.interventions import DiMDirection, DiMMeans, Fitted, get_intervention
from refusal.interventions.export import apply_plan_, orthogonalize_
from refusal.interventions.weighted import (
    Kernel,
    column_scales,
    interpolated_direction,
    projected_direction,
    row_scales,
    writer_linear,
)
from refusal.models.architecture import residual_layout

#: Exported (float32 weights edited in float64) vs hooked (float32 activations): the same maths in another order.
LOGIT_TOLERANCE = 1e-4


def make(name: str, fitted: Fitted, **cfg):
    return get_intervention(name, [REPO / "plugins"])({"name": name, **cfg}, fitted)


def fitted_for(bundle, seed: int = 0, layer: int = 2) -> Fitted:
    """DiM at ``layer`` and class means at every site (random, but the DiM direction is their difference there)."""
    g = torch.Generator().manual_seed(seed)
    sites, d = bundle.n_layers + 1, bundle.d_model
    harmful, harmless = torch.randn(sites, d, generator=g), torch.randn(sites, d, generator=g)
    means = DiMMeans(harmful, harmless, position=-1)
    return Fitted(dim=DiMDirection(means.directions[layer].clone(), layer, -1), dim_means=means)


def hooked_and_exported(bundle, intervention, prompts, folder):
    ids = bundle.tokenize_instructions(prompts)
    with torch.no_grad(), intervention.apply(bundle):
        hooked = forward(bundle, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(intervention.export_weights(bundle, folder)).eval()
    batch = bundle.pad(ids)
    with torch.no_grad():
        exported = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids).logits
    return hooked, exported, reloaded


# -- projected direction -------------------------------------------------------------------------------
def test_projected_direction_by_hand():
    r = torch.tensor([1.0, 1.0, 0.0])  # r̂ = (1, 1, 0)/√2, μ̂ = e0: r' = e1
    torch.testing.assert_close(projected_direction(r, torch.tensor([2.0, 0.0, 0.0])), torch.tensor([0.0, 1.0, 0.0]))
    r = torch.tensor([3.0, 4.0, 12.0])  # μ̂ = e2: r̂ − (12/13) e2 = (3, 4, 0)/13, renormalised (0.6, 0.8, 0)
    torch.testing.assert_close(projected_direction(r, torch.tensor([0.0, 0.0, -5.0])), torch.tensor([0.6, 0.8, 0.0]))


def test_projected_direction_is_a_unit_vector_orthogonal_to_the_harmless_mean():
    r, mu = 5 * random_unit(64, 1), 30 * random_unit(64, 2) + 0.5 * random_unit(64, 1)
    out = projected_direction(r, mu)
    assert abs(float(out.norm()) - 1) < 1e-6 and abs(float(out @ mu / mu.norm())) < 1e-6
    assert float(out @ r) > 0  # the refusal side is kept


def test_a_direction_parallel_to_the_harmless_mean_is_refused_with_its_cosine():
    mu = random_unit(32, 3)
    with pytest.raises(ConfigError, match=r"parallel to the harmless mean \(cosine -1.000000\).*projected=false"):
        projected_direction(-2 * mu + 1e-6 * random_unit(32, 4), mu)


# -- heretic's kernel and direction index --------------------------------------------------------------
def test_kernel_matches_heretic_formula_by_hand():
    k = Kernel(max_weight=1.2, max_weight_position=5.5, min_weight=0.3, min_weight_distance=2.0)
    # distance 0.5: 1.2 + 0.25·(0.3 − 1.2) = 0.975; distance 1.5: 1.2 + 0.75·(−0.9) = 0.525; distance 2.5 > 2: none
    expected = {3: None, 4: 0.525, 5: 0.975, 6: 0.975, 7: 0.525, 8: None}
    for layer, weight in expected.items():
        got = k.weight(layer)
        assert got is None if weight is None else math.isclose(got, weight, rel_tol=1e-12), (layer, got)
    edge = Kernel(max_weight=1.0, max_weight_position=5.0, min_weight=0.25, min_weight_distance=2.0)
    assert edge.weight(7) == 0.25 and edge.weight(3) == 0.25 and edge.weight(8) is None  # heretic skips only distance >
    assert edge.weight(5) == 1.0


def test_interpolated_direction_by_hand():
    sites = torch.eye(5)  # hidden states 0..4 (embeddings, then blocks 0..3's outputs)
    expected = torch.tensor([0.0, 0.75, 0.25, 0.0, 0.0])  # index 0.25: modf(1.25) → lerp(site 1, site 2, 0.25)
    torch.testing.assert_close(interpolated_direction(sites, 0.25), expected / expected.norm())
    torch.testing.assert_close(interpolated_direction(sites, 2.0), sites[3])  # whole index: block 2's output
    with pytest.raises(ConfigError, match=r"direction_index=3.0 must be a layer index in \[0, 3\)"):
        interpolated_direction(sites, 3.0)


@pytest.mark.parametrize(("override", "message"), [
    ("intervention.attn_max_weight=3", r"attn_max_weight=3 must be in \[0, 2\]"),
    ("intervention.mlp_min_weight=-0.5", r"mlp_min_weight=-0.5 must be in \[0, 2\]"),
    ("intervention.attn_min_weight_distance=0", r"attn_min_weight_distance=0 must be > 0"),
    ("intervention.mlp_max_weight_position=4", r"mlp_max_weight_position=4 is out of range for a model with 4 layers"),
    ("intervention.direction=last", r"direction='last' must be one of dim, per_layer, index"),
    ("intervention.direction=index", r"direction=index needs intervention.direction_index"),
    ("intervention.direction=index intervention.direction_index=-1", r"direction_index=-1 must be in \[0, 3\) layers"),
    ("intervention.direction=index intervention.direction_index=1 intervention.units=fractions",
     r"direction_index=1 must be in \[0, 1\) \(a fraction of the last layer index"),
    ("intervention.units=percent", r"units='percent' must be 'layers' or 'fractions'"),
    ("intervention.units=fractions intervention.attn_max_weight_position=1.2",
     r"attn_max_weight_position=1.2 must be in \[0, 1\] with units=fractions"),
    ("intervention.units=fractions intervention.mlp_min_weight=1.5", r"mlp_min_weight=1.5 must be in \[0, 1\] with units"),
    ("intervention.norm_preserving=maybe", r"norm_preserving='maybe' must be true .*, rows .* or false"),
    ("intervention.norm_preserving=rows", r"norm_preserving=rows \(heretic's\) edits the attention/MLP writes only; "
                                          r"set intervention.embedding=false"),
])
def test_out_of_range_kernel_parameters_fail_before_the_model_loads(compose, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose("intervention=weighted_ablation", *override.split()))  # no bundle: before loading


def test_projected_ablation_points_row_preservation_to_the_weighted_plugin(compose):
    with pytest.raises(ConfigError, match=r"projected_ablation: norm_preserving=rows .* use intervention=weighted_ablation "
                                          r"intervention.projected=true intervention.embedding=false"):
        check_config(compose("intervention=projected_ablation", "intervention.norm_preserving=rows"))


def test_a_direction_index_past_the_model_fails_once_its_layers_are_known(tiny_bundle):
    with pytest.raises(ConfigError, match=r"direction_index=3 must be in \[0, 3\) layers"):
        make("weighted_ablation", fitted_for(tiny_bundle), direction="index", direction_index=3)


def test_kernel_edges_are_accepted(compose):
    check_config(compose("intervention=weighted_ablation", "intervention.attn_max_weight=2", "intervention.mlp_min_weight=0",
                         "intervention.attn_max_weight_position=3", "intervention.direction=index",
                         "intervention.direction_index=2.99"))
    check_config(compose("intervention=weighted_ablation", "intervention.units=fractions", "intervention.direction=index",
                         "intervention.direction_index=0.99", "intervention.attn_max_weight_position=1",
                         "intervention.mlp_min_weight=1", "intervention.norm_preserving=rows", "intervention.embedding=false"))


def test_the_plan_follows_the_kernel_per_component(tiny_bundle):
    fitted = fitted_for(tiny_bundle)
    ablation = make("weighted_ablation", fitted, attn_max_weight=1.5, attn_max_weight_position=1.0, attn_min_weight=0.5,
                    attn_min_weight_distance=1.0, mlp_max_weight=0.8, mlp_max_weight_position=3.0, mlp_min_weight=0.0,
                    mlp_min_weight_distance=2.0, embedding=False)
    plan = ablation.weight_plan(tiny_bundle.n_layers)
    weights = {key: edit.weight for key, edit in plan.writes.items()}
    assert weights == {(0, "attn"): 0.5, (1, "attn"): 1.5, (2, "attn"): 0.5,
                       (1, "mlp"): 0.0, (2, "mlp"): 0.4, (3, "mlp"): 0.8}
    assert plan.embedding is None


def test_fraction_units_are_heretics_sampling_units(tiny_bundle):
    """heretic/main.py: position and distance are sampled as multiples of last = n_layers − 1, min_weight as a
    fraction of max_weight; direction_index likewise. tiny has 4 layers: last = 3."""
    fitted = fitted_for(tiny_bundle)
    by_fraction = make("weighted_ablation", fitted, units="fractions", direction="index", direction_index=0.5,
                       attn_max_weight=1.2, attn_max_weight_position=0.5, attn_min_weight=0.25,
                       attn_min_weight_distance=1 / 3)
    by_layer = make("weighted_ablation", fitted, direction="index", direction_index=1.5, attn_max_weight=1.2,
                    attn_max_weight_position=1.5, attn_min_weight=0.3, attn_min_weight_distance=1.0)
    assert by_fraction.kernels()["attn"] == Kernel(1.2, 1.5, 0.3, 1.0) == by_layer.kernels()["attn"]
    assert by_fraction.direction == by_layer.direction == 1.5
    plans = [a.weight_plan(tiny_bundle.n_layers) for a in (by_fraction, by_layer)]
    assert {k: e.weight for k, e in plans[0].writes.items()} == {k: e.weight for k, e in plans[1].writes.items()}
    assert {(1, "attn"), (2, "attn")} <= plans[0].writes.keys() and (0, "attn") not in plans[0].writes  # |0 − 1.5| > 1


def test_per_layer_and_fractional_directions_are_heretics(tiny_bundle):
    fitted = fitted_for(tiny_bundle)
    units = fitted.dim_means.directions / fitted.dim_means.directions.norm(dim=-1, keepdim=True)
    per_layer = make("weighted_ablation", fitted, direction="per_layer").weight_plan(tiny_bundle.n_layers)
    for layer in range(tiny_bundle.n_layers):  # layer l's writes: the direction at block l's output (hidden state l + 1)
        torch.testing.assert_close(per_layer.writes[(layer, "mlp")].unit, units[layer + 1])
    fractional = make("weighted_ablation", fitted, direction="index", direction_index=1.5).weight_plan(tiny_bundle.n_layers)
    mixed = (units[2] + units[3]) / 2
    torch.testing.assert_close(fractional.writes[(0, "attn")].unit, mixed / mixed.norm())
    projected = make("weighted_ablation", fitted, direction="index", direction_index=1.5, projected=True).weight_plan(tiny_bundle.n_layers)
    harmless = fitted.dim_means.harmless  # heretic projects each site first, then mixes
    mixed = projected_direction(units[2], harmless[2]) + projected_direction(units[3], harmless[3])
    torch.testing.assert_close(projected.writes[(3, "mlp")].unit, mixed / mixed.norm())


def test_a_zero_direction_at_the_chosen_site_is_refused(tiny_bundle):
    fitted = fitted_for(tiny_bundle)
    fitted.dim_means.harmful[1] = fitted.dim_means.harmless[1]  # no class difference at hidden state 1
    with pytest.raises(ConfigError, match="hidden state 1.*zero DiM direction"):
        make("weighted_ablation", fitted, direction="per_layer")
    fitted.dim_means.harmful[3] = fitted.dim_means.harmless[3]
    with pytest.raises(ConfigError, match="hidden state 3.*zero DiM direction"):
        make("weighted_ablation", fitted, direction="index", direction_index=1.5, projected=True)
    whole = make("weighted_ablation", fitted, direction="index", direction_index=1.0, projected=True)  # reads hidden state 2 alone: fine
    assert bool(torch.isfinite(whole.weight_plan(tiny_bundle.n_layers).writes[(0, "attn")].unit).all())


def test_projected_ablation_refuses_a_direction_along_the_harmless_mean(tiny_bundle):
    fitted = fitted_for(tiny_bundle)
    fitted.dim_means.harmless[2] = -3 * fitted.dim.direction
    with pytest.raises(ConfigError, match="at layer 2: the refusal direction is parallel"):
        make("projected_ablation", fitted)


# -- norm preservation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1.0, 0.6, 1.7])
def test_norm_preserving_edit_keeps_every_column_norm(strength):
    g = torch.Generator().manual_seed(0)
    W, u = torch.randn(48, 80, generator=g, dtype=torch.float64), random_unit(48, 5).double()
    u = u / u.norm()  # unit in float64
    edited = (W - strength * torch.outer(u, u @ W)) * column_scales(W, u, strength)
    assert float((edited.norm(dim=0) - W.norm(dim=0)).abs().max()) < 1e-5
    if strength == 1.0:  # rescaled columns stay orthogonal to u: the write has no component along it
        assert float((u @ edited).abs().max()) < 1e-12
    assert torch.equal(column_scales(torch.outer(u, torch.ones(3)), u, 1.0), torch.ones(3))  # a vanishing column: 1


@pytest.mark.parametrize("strength", [1.0, 0.6, 1.4])
def test_row_preservation_is_heretics_full_row_normalisation_by_hand(strength):
    """heretic 1.4.0 (model.py, row_normalization="full"): rows normalised, W + (−w·v)(vᵀŴ), renormalised,
    times the old row norms; here without its rank-3 LoRA approximation of the difference."""
    g = torch.Generator().manual_seed(1)
    W, u = torch.randn(24, 40, generator=g, dtype=torch.float64), random_unit(24, 6).double()
    u = u / u.norm()
    n = W.norm(dim=1, keepdim=True)
    unit_rows = W / n
    edited = unit_rows + torch.outer(-strength * u, u @ unit_rows)
    heretic = edited / edited.norm(dim=1, keepdim=True) * n
    norms, gains = row_scales(W, u, strength)
    ours = gains.unsqueeze(1) * (unit_rows - strength * torch.outer(u, u @ unit_rows))
    torch.testing.assert_close(norms, n.squeeze(1))
    torch.testing.assert_close(ours, heretic)
    assert float((ours.norm(dim=1) - W.norm(dim=1)).abs().max()) < 1e-12


def test_exported_norm_preserving_weights_keep_their_norms(tiny_bundle):
    model = AutoModelForCausalLM.from_config(tiny_bundle.model.config)
    model.load_state_dict(tiny_bundle.model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan_(model, make("projected_ablation", fitted_for(tiny_bundle), norm_preserving=True).weight_plan(4))
    layout = tiny_bundle.layout
    for writer in (*layout.attn_writers, *layout.mlp_writers):
        name = next(n for n, m in tiny_bundle.model.named_modules() if m is writer_linear(writer))
        w0, w1 = before[f"{name}.weight"], model.get_submodule(name).weight
        assert float((w1.norm(dim=0) - w0.norm(dim=0)).abs().max()) < 1e-5 and not torch.equal(w0, w1)
    emb = model.get_input_embeddings().weight
    assert float((emb.norm(dim=1) - before["model.embed_tokens.weight"].norm(dim=1)).abs().max()) < 1e-5


# -- weights equal hooks --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cfg", [
    ("projected_ablation", {}),
    ("projected_ablation", {"norm_preserving": True}),
    ("weighted_ablation", {"direction": "index", "direction_index": 1.25, "projected": True, "norm_preserving": True, "attn_max_weight": 1.3,
                           "attn_max_weight_position": 2.0, "attn_min_weight": 0.4, "attn_min_weight_distance": 1.5,
                           "mlp_max_weight_position": 1.0, "mlp_min_weight": 0.2}),
    ("weighted_ablation", {"direction": "per_layer", "embedding": False, "mlp_max_weight": 0.9}),
    ("weighted_ablation", {"direction": "index", "direction_index": 0.6, "units": "fractions", "projected": True,
                           "embedding": False, "norm_preserving": "rows", "attn_max_weight": 1.4,
                           "attn_max_weight_position": 0.7, "attn_min_weight": 0.3, "attn_min_weight_distance": 0.4}),
])
def test_exported_checkpoint_logits_equal_the_hooked_models(tiny_tied_bundle, prompts, tmp_path, name, cfg):
    bundle = tiny_tied_bundle
    with torch.no_grad():
        plain = forward(bundle, bundle.tokenize_instructions(prompts))
    hooked, exported, reloaded = hooked_and_exported(bundle, make(name, fitted_for(bundle, 7), **cfg), prompts, tmp_path / "x")
    assert float((exported - hooked).abs().max()) <= LOGIT_TOLERANCE
    assert float((hooked - plain).abs().max()) > 100 * LOGIT_TOLERANCE  # the edit changed the model
    torch.testing.assert_close(reloaded.lm_head.weight, bundle.model.lm_head.weight)  # untied, unembedding kept


def test_weighted_ablation_defaults_are_dim_ablation(tiny_bundle, prompts):
    fitted = fitted_for(tiny_bundle, 3)
    ids = tiny_bundle.tokenize_instructions(prompts)
    with torch.no_grad():
        with make("dim_ablation", fitted).apply(tiny_bundle):
            dim = forward(tiny_bundle, ids)
        with make("weighted_ablation", fitted).apply(tiny_bundle):
            weighted = forward(tiny_bundle, ids)
        with make("projected_ablation", fitted, projected=False).apply(tiny_bundle):
            unprojected = forward(tiny_bundle, ids)
    assert float((weighted - dim).abs().max()) <= 1e-5 and float((unprojected - dim).abs().max()) <= 1e-5


def test_dim_ablation_export_is_bit_identical_to_the_orthogonalisation_it_always_was(tiny_tied_bundle):
    """The plan-based export with u = r̂, w = 1 everywhere stores exactly (I − r̂r̂ᵀ)W computed in float64."""
    bundle, unit = tiny_tied_bundle, random_unit(tiny_tied_bundle.d_model, 9)
    model = AutoModelForCausalLM.from_config(bundle.model.config)
    model.load_state_dict(bundle.model.state_dict())
    orthogonalize_(model, unit)
    u = unit.double()
    for writer in (*bundle.layout.attn_writers, *bundle.layout.mlp_writers):
        name = next(n for n, m in bundle.model.named_modules() if m is writer_linear(writer))
        w = writer_linear(writer).weight.double()
        assert torch.equal(model.get_submodule(name).weight, (w - torch.outer(u, u @ w)).float())
    e = bundle.model.get_input_embeddings().weight.double()
    assert torch.equal(model.get_input_embeddings().weight, (e - torch.outer(e @ u, u)).float())


# -- through the pipeline -------------------------------------------------------------------------------
def test_evaluate_exports_the_weighted_ablation_and_the_means_match_the_dim_fit(compose, tmp_path, prompts):
    from refusal.context import prepare
    from refusal.evaluation import run_evaluation
    from refusal.fits import fit

    small = ["data.n_train=16", "data.n_val=8", "data.n_test=4", "eval.max_new_tokens=2", "fit.dim.n_prompts=4",
             "geometry.enabled=false"]
    cfg = compose("intervention=weighted_ablation", "intervention.export=true", "intervention.projected=true",
                  "intervention.norm_preserving=true", "intervention.direction=index", "intervention.direction_index=1.5",
                  *small)
    results = run_evaluation(cfg, tmp_path / "run")
    ctx = prepare(cfg)
    fitted = fit(ctx, {"dim_means"})
    means = fitted.dim_means  # the DiM direction is the means' difference at its own layer and position
    torch.testing.assert_close(means.directions[fitted.dim.layer], fitted.dim.direction, atol=1e-5, rtol=1e-5)
    assert means.harmful.shape == (ctx.bundle.n_layers + 1, ctx.bundle.d_model)
    ablation = make("weighted_ablation", fitted, projected=True, norm_preserving=True, direction="index",
                    direction_index=1.5)
    hooked, exported, _ = hooked_and_exported(ctx.bundle, ablation, prompts, tmp_path / "again")
    reloaded = AutoModelForCausalLM.from_pretrained(results["exported_checkpoint"]).eval()
    batch = ctx.bundle.pad(ctx.bundle.tokenize_instructions(prompts))
    with torch.no_grad():
        logits = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids).logits
    assert float((logits - hooked).abs().max()) <= LOGIT_TOLERANCE


@pytest.mark.parametrize("preserve", [{"norm_preserving": True}, {"norm_preserving": "rows", "embedding": False}])
def test_biased_writes_are_projected_alike_in_hooks_and_weights(tiny_bundle, prompts, preserve):
    """Output-projection biases (Qwen's attention has none, GPT-style models do): ablated, not rescaled, in both forms."""
    model = copy.deepcopy(tiny_bundle.model)
    g = torch.Generator().manual_seed(4)
    layout = residual_layout(model)
    for writer in (*layout.attn_writers, *layout.mlp_writers):
        linear = writer_linear(writer)
        linear.bias = torch.nn.Parameter(0.5 * torch.randn(linear.out_features, generator=g))
    biased = dataclasses.replace(tiny_bundle, model=model, layout=layout, memo={})
    ablation = make("weighted_ablation", fitted_for(tiny_bundle, 2), **preserve, projected=True,
                    attn_max_weight=1.3, mlp_min_weight=0.5, mlp_min_weight_distance=2.0)
    ids = tiny_bundle.tokenize_instructions(prompts)
    with torch.no_grad():
        with ablation.apply(biased):
            hooked = forward(biased, ids)
        edited = dataclasses.replace(biased, model=apply_plan_(copy.deepcopy(model), ablation.weight_plan(4)))
        edited = dataclasses.replace(edited, layout=residual_layout(edited.model))
        assert float((forward(edited, ids) - hooked).abs().max()) <= LOGIT_TOLERANCE
