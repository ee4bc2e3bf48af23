"""The intervention contract: the flip's signs for every centre, the random control's centre, checked
edit outputs, and plugins that provide only some of residual_edit / write_edit / hook_specs."""

from __future__ import annotations

import inspect
import re
import textwrap

import pytest
import torch
from conftest import REPO
from test_interventions import forward

from refusal.errors import ConfigError, InterventionError
from refusal.fitting.inlp import INLPResult
from refusal.interventions import (
    DiMDirection,
    Fitted,
    Intervention,
    available,
    get_intervention,
    load_plugin_dir,
)
from refusal.runtime.hooks import HookSpec, hooked
from refusal.runtime.roles import declare_roles

CENTRES = ("midpoint", "zero", "harmful_mean", "harmless_mean")
TARGETS = ("harmless", "harmful")


def make(name: str, fitted: Fitted, **cfg):
    return get_intervention(name, [REPO / "plugins"])({"name": name, **cfg}, fitted)


def planted_inlp(W: torch.Tensor, safe: torch.Tensor, harm: torch.Tensor, offset: torch.Tensor) -> INLPResult:
    """A real INLPResult whose class means sit at rowspace coordinates ``safe`` / ``harm`` plus ``offset``."""
    mean_harmless, mean_harmful = offset + safe @ W, offset + harm @ W
    k = W.shape[0]
    return INLPResult(directions=W, train_accuracy=[1.0] * k, val_accuracy=[1.0] * k, mean_harmful=mean_harmful,
                      mean_harmless=mean_harmless, center=(mean_harmful + mean_harmless) / 2, n_useful=k, chance=0.5)


@pytest.fixture
def planted():
    """Two well separated classes in d=8 along k=3 orthonormal directions: the harmful mean is on the positive
    side of rows 0 and 1 and the negative side of row 2, and the origin is outside both classes on every row
    (so centre=zero has the classes on one side of the centre)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    W, offset = q.T[:3].float().contiguous(), 3.0 * q.T[3].float()
    inlp = planted_inlp(W, torch.tensor([2.0, 1.0, -1.0]), torch.tensor([8.0, 7.0, -6.0]), offset)
    fitted = Fitted(dim=DiMDirection(inlp.mean_harmful - inlp.mean_harmless, layer=2, position=-1), inlp=inlp, inlp_layer=2)
    samples = {"harmful": inlp.mean_harmful + 0.3 * torch.randn(200, 8, generator=g),
               "harmless": inlp.mean_harmless + 0.3 * torch.randn(200, 8, generator=g)}
    return inlp, fitted, samples


def centre_of(inlp: INLPResult, centre: str) -> torch.Tensor:
    return {"midpoint": inlp.center, "zero": torch.zeros_like(inlp.center), "harmful_mean": inlp.mean_harmful,
            "harmless_mean": inlp.mean_harmless}[centre]


def test_the_centres_and_targets_tested_are_all_the_accepted_ones(planted):
    _, fitted, _ = planted
    for centre in CENTRES:
        for target in TARGETS:
            make("inlp_flip", fitted, center=centre, target=target)
    with pytest.raises(ConfigError, match=re.escape(str(CENTRES))):
        make("inlp_flip", fitted, center="origin")
    with pytest.raises(ConfigError, match="'harmless'.*'harmful'"):
        make("inlp_flip", fitted, target="neutral")


# -- 1. the flip's signs -----------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("centre", CENTRES)
def test_flip_sends_both_classes_to_the_target_side_for_every_centre(planted, centre, target):
    """Measured from the centre, every rowspace coordinate ends on the target's side (the sign of
    μ_target − μ_other along it); a point already there is not moved; the nullspace is untouched."""
    inlp, fitted, samples = planted
    other = "harmful" if target == "harmless" else "harmless"
    W, mu = inlp.directions, centre_of(inlp, centre)
    side = torch.sign((getattr(inlp, f"mean_{target}") - getattr(inlp, f"mean_{other}")) @ W.T)
    flip = make("inlp_flip", fitted, center=centre, target=target, alpha=1.0)
    nullspace = torch.eye(8) - W.T @ W
    for x in samples.values():
        out = flip.transform(x)
        before, after = (x - mu) @ W.T, (out - mu) @ W.T
        assert (torch.sign(after) == side).all()
        torch.testing.assert_close(after.abs(), before.abs(), rtol=0, atol=1e-5)  # a reflection through the centre
        torch.testing.assert_close(out @ nullspace, x @ nullspace, rtol=0, atol=1e-5)
        kept = (torch.sign(before) == side).all(dim=1)
        assert torch.equal(out[kept], x[kept])
    if centre in ("midpoint", f"{target}_mean"):  # these centres also carry the other class past the class boundary
        moved = flip.transform(samples[other])
        assert (torch.sign((moved - inlp.center) @ W.T) == side).all()


def test_flip_about_the_target_mean_is_no_longer_a_no_op_on_the_other_class(planted):
    """The reported case: center=harmless_mean target=harmless left harmful activations where they were."""
    inlp, fitted, samples = planted
    flip = make("inlp_flip", fitted, center="harmless_mean", target="harmless")
    W = inlp.directions
    out = flip.transform(samples["harmful"])
    expected = inlp.mean_harmless - (samples["harmful"] - inlp.mean_harmless) @ W.T @ W  # mirrored through μ_harmless
    torch.testing.assert_close(out @ W.T, expected @ W.T, rtol=0, atol=1e-4)


# -- 2. the random control's centre -------------------------------------------------------------------
def control_and_nullspace(d: int, k: int, seed: int, layer: int = 2):
    """A fitted state whose INLP directions ARE the random control's basis (k rows, seed), with random means."""
    control_basis = inspect.getmodule(get_intervention("random_ablation", [REPO / "plugins"])).random_subspace(d, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    inlp = planted_inlp(control_basis, 4 * torch.randn(k, generator=g), 4 * torch.randn(k, generator=g), torch.randn(d, generator=g))
    return Fitted(dim=DiMDirection(inlp.mean_harmful - inlp.mean_harmless, layer, -1), inlp=inlp, inlp_layer=layer), control_basis


def test_random_ablation_accepts_exactly_nullspaces_centres_and_defaults_to_its_default():
    fitted, _ = control_and_nullspace(8, 2, 0)
    for centre in CENTRES:
        assert make("random_ablation", fitted, center=centre).params()["center"] == centre
    assert make("random_ablation", fitted).centre_name == make("inlp_nullspace", fitted).centre_name == "midpoint"
    with pytest.raises(ConfigError, match=re.escape(str(CENTRES))):
        make("random_ablation", fitted, center="origin")
    assert "inlp" in get_intervention("random_ablation", [REPO / "plugins"]).needs  # the centre is the INLP fit's


def test_full_rank_control_by_hand_sends_everything_to_the_centre():
    """k = d: x − QᵀQ(x − μ) = μ for every x whatever Q is; uncentred (zero) it is 0, the old behaviour."""
    fitted, _ = control_and_nullspace(6, 6, 4)
    x = torch.randn(5, 6)
    for centre in CENTRES:
        expected = centre_of(fitted.inlp, centre).expand(5, -1)
        torch.testing.assert_close(make("random_ablation", fitted, k=6, center=centre).transform(x), expected,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("centre", CENTRES)
def test_control_with_nullspaces_centre_removes_what_nullspace_removes(centre):
    """With its basis as INLP's directions, the control equals inlp_nullspace: along Q the mean coordinate
    is μ's (Q x̄' = Q μ), the orthogonal part is kept, and writes are projected without the centre."""
    fitted, Q = control_and_nullspace(16, 3, 7)
    mu = centre_of(fitted.inlp, centre)
    x = torch.randn(40, 16) + 5.0
    control = make("random_ablation", fitted, k=3, seed=7, center=centre)
    nullspace = make("inlp_nullspace", fitted, center=centre)
    out = control.transform(x)
    torch.testing.assert_close(out, nullspace.transform(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.mean(0) @ Q.T, mu @ Q.T, rtol=0, atol=1e-5)
    P = torch.eye(16) - Q.T @ Q
    torch.testing.assert_close(out @ P, x @ P, rtol=0, atol=1e-5)
    same = lambda t: t  # noqa: E731
    w = torch.randn(7, 16)
    torch.testing.assert_close(control.write_edit(2, same)(w), w - (w @ Q.T) @ Q, rtol=0, atol=1e-5)
    torch.testing.assert_close(control.write_edit(2, same)(w), nullspace.write_edit(2, same)(w), rtol=0, atol=1e-6)


def test_uncentred_control_keeps_the_old_formula():
    fitted, Q = control_and_nullspace(16, 3, 7)
    x = torch.randn(40, 16) + 5.0
    torch.testing.assert_close(make("random_ablation", fitted, k=3, seed=7, center="zero").transform(x),
                               x - (x @ Q.T) @ Q, rtol=0, atol=1e-5)


def test_control_at_every_layer_steers_the_tiny_model_exactly_like_nullspace(tiny_bundle, prompts):
    fitted, _ = control_and_nullspace(tiny_bundle.d_model, 4, 11)
    ids = tiny_bundle.tokenize_instructions(prompts)
    with make("inlp_nullspace", fitted, layers="all").apply(tiny_bundle):
        expected = forward(tiny_bundle, ids)
    with make("random_ablation", fitted, k=4, seed=11, layers="all").apply(tiny_bundle):
        got = forward(tiny_bundle, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_control_uses_each_layers_own_inlp_centre(tiny_bundle):
    fitted, Q = control_and_nullspace(tiny_bundle.d_model, 3, 5)
    g = torch.Generator().manual_seed(9)
    own = {layer: planted_inlp(fitted.inlp.directions, torch.randn(3, generator=g), torch.randn(3, generator=g),
                               torch.randn(tiny_bundle.d_model, generator=g)) for layer in (1, 3)}
    per_layer = Fitted(dim=fitted.dim, inlp=fitted.inlp, inlp_layer=2, inlp_by_layer=own)
    control = make("random_ablation", per_layer, k=3, seed=5, layers=[1, 3])
    for layer in (1, 3):
        out = control.residual_edit(layer, lambda t: t)(torch.randn(5, tiny_bundle.d_model))
        torch.testing.assert_close(out @ Q.T, own[layer].center.expand(5, -1) @ Q.T, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="no per-layer INLP fit for layer 0"):
        make("random_ablation", per_layer, k=3, layers=[0, 1]).hook_specs(tiny_bundle)


# -- 3. every edit's first output is checked --------------------------------------------------------
class WrongShape(Intervention):
    name = "contract_wrong_shape"
    description = "Test plugin: drops the last feature."

    def residual_edit(self, layer, cast):
        return lambda x: x[..., :-1]


class OneVector(Intervention):
    name = "contract_one_vector"
    description = "Test plugin: returns a single vector (broadcasts under a position scope)."

    def residual_edit(self, layer, cast):
        return lambda x: x[0, 0]


class NonFinite(Intervention):
    name = "contract_non_finite"
    description = "Test plugin: NaN at the layers listed in `bad` (all in scope by default)."

    def residual_edit(self, layer, cast):
        bad = self.cfg.get("bad")
        return (lambda x: x * float("nan")) if bad is None or layer in bad else (lambda x: x)


class WrongDtype(Intervention):
    name = "contract_wrong_dtype"
    description = "Test plugin: upcasts to float64."

    def residual_edit(self, layer, cast):
        return lambda x: x.double()


class BadWrite(Intervention):
    name = "contract_bad_write"
    description = "Test plugin: a projection whose write edit returns inf."
    default_layers = "all"
    edits_writes = True

    def residual_edit(self, layer, cast):
        return lambda x: x

    def write_edit(self, layer, cast):
        return lambda w: w / 0.0


class GoodOnce(Intervention):
    name = "contract_good_once"
    description = "Test plugin: fine on the first call of each hook, NaN on later calls."

    def residual_edit(self, layer, cast):
        calls = []
        return lambda x: x if not calls.append(1) and len(calls) == 1 else x * float("nan")


def no_hooks_left(bundle) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in bundle.model.modules())


def raised(bundle, prompts, intervention, roles: bool = False) -> str:
    ids = bundle.tokenize_instructions(prompts)
    with pytest.raises(InterventionError) as err, intervention.apply(bundle):
        if roles:
            with declare_roles(bundle, [len(r) for r in ids], max(len(r) for r in ids)):
                forward(bundle, ids)
        else:
            forward(bundle, ids)
    assert no_hooks_left(bundle)
    return str(err.value)


def test_a_wrong_shape_names_the_intervention_layer_hook_and_both_shapes(tiny_bundle, prompts):
    message = raised(tiny_bundle, prompts, make("contract_wrong_shape", Fitted(), layer=2))
    width = max(len(r) for r in tiny_bundle.tokenize_instructions(prompts))
    assert message == (f"intervention 'contract_wrong_shape' at layer 2 (block input) returned shape (4, {width}, 63), "
                       f"expected (4, {width}, 64) (its input's); an edit must return a tensor shaped like its input")


def test_a_broadcasting_output_is_caught_under_a_position_scope_too(tiny_bundle, prompts):
    message = raised(tiny_bundle, prompts, make("contract_one_vector", Fitted(), layer=1, positions="prompt"), roles=True)
    assert message.startswith("intervention 'contract_one_vector' at layer 1 (block input) returned shape (64,), expected (4, ")


def test_non_finite_values_are_blamed_on_the_intervention_not_the_dtype(tiny_bundle, prompts):
    message = raised(tiny_bundle, prompts, make("contract_non_finite", Fitted(), layer=3))
    assert message.startswith("intervention 'contract_non_finite' at layer 3 (block input) returned non-finite values")


def test_a_wrong_dtype_is_named(tiny_bundle, prompts):
    message = raised(tiny_bundle, prompts, make("contract_wrong_dtype", Fitted(), layer=0))
    assert "'contract_wrong_dtype' at layer 0 (block input) returned torch.float64 on cpu, expected torch.float32 on cpu" in message


def test_a_bad_write_edit_names_the_attention_output(tiny_bundle, prompts):
    message = raised(tiny_bundle, prompts, make("contract_bad_write", Fitted()))
    assert message.startswith("intervention 'contract_bad_write' at layer 0 (attention output) returned non-finite values")


def test_each_hook_checks_its_own_first_output(tiny_bundle, prompts):
    message = raised(tiny_bundle, prompts, make("contract_non_finite", Fitted(), layers=[1, 3], bad=[3]))
    assert message.startswith("intervention 'contract_non_finite' at layer 3 (block input)")


def test_after_the_first_good_call_nothing_is_checked(tiny_bundle, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    with make("contract_good_once", Fitted(), layer=2).apply(tiny_bundle):
        first = forward(tiny_bundle, ids)
        second = forward(tiny_bundle, ids)  # NaN now: the hook no longer checks, so it passes through
    assert torch.isfinite(first).all() and torch.isnan(second).all()


def test_non_finite_input_is_not_blamed_on_the_edit(tiny_bundle, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    poison = HookSpec(tiny_bundle.layout.blocks[1], lambda x: x * float("nan"), "pre")
    with hooked([poison]), make("contract_non_finite", Fitted(), layer=2).apply(tiny_bundle):
        assert torch.isnan(forward(tiny_bundle, ids)).all()


def test_hooks_a_plugin_builds_itself_are_checked_and_named_by_module(tiny_bundle, prompts):
    class OwnBadHooks(Intervention):
        name = "contract_own_bad_hooks"
        description = "Test plugin: a bad hook on a query projection."

        def hook_specs(self, bundle):
            return [HookSpec(bundle.layout.blocks[1].self_attn.q_proj, lambda y: y[..., :3], "post")]

    message = raised(tiny_bundle, prompts, make("contract_own_bad_hooks", Fitted()))
    assert message.startswith("intervention 'contract_own_bad_hooks' at model.layers.1.self_attn.q_proj (output) "
                              "returned shape (4, ")


# -- 4. any one of residual_edit, write_edit, hook_specs ---------------------------------------------
class ScaleValues(Intervention):
    name = "contract_hook_specs_only"
    description = "Test plugin: scales layer 1's attention values (builds its own hooks)."

    def hook_specs(self, bundle):
        return [HookSpec(bundle.layout.blocks[1].self_attn.v_proj, lambda v: 0.5 * v, "post")]


def test_a_plugin_with_only_hook_specs_runs_and_its_hook_comes_off(tiny_bundle, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    before = forward(tiny_bundle, ids)
    plugin = make("contract_hook_specs_only", Fitted())
    assert plugin.fingerprint(tiny_bundle.n_layers) and plugin.layers(tiny_bundle.n_layers) == []
    v_proj = tiny_bundle.layout.blocks[1].self_attn.v_proj
    with plugin.apply(tiny_bundle):
        assert len(v_proj._forward_hooks) == 1
        during = forward(tiny_bundle, ids)
    assert not torch.allclose(during, before)
    assert no_hooks_left(tiny_bundle) and torch.equal(forward(tiny_bundle, ids), before)


def test_a_plugin_with_only_hook_specs_runs_through_evaluate(compose, tmp_path):
    from refusal.evaluation import run_evaluation

    cfg = compose("intervention=none", "intervention.name=contract_hook_specs_only", "data.n_train=16", "data.n_val=8",
                  "data.n_test=8", "eval.max_new_tokens=4", "fit.dim.n_prompts=4", "geometry.enabled=false")
    results = run_evaluation(cfg, tmp_path / "run")
    assert results["intervention"] == "contract_hook_specs_only" and results["metrics"]["harmless/kl_div"] > 0


def test_a_plugin_with_only_write_edit_edits_the_writes_at_its_layers(tiny_bundle, prompts):
    class MuteWrites(Intervention):
        name = "contract_write_only"
        description = "Test plugin: zeroes the attention and MLP writes of the layers in scope."

        def write_edit(self, layer, cast):
            return lambda w: 0.0 * w

    ids = tiny_bundle.tokenize_instructions(prompts)
    seen: dict[int, torch.Tensor] = {}
    record = [HookSpec(tiny_bundle.layout.blocks[i], lambda x, i=i: seen.__setitem__(i, x.clone()) or x, "pre") for i in (1, 2)]
    with make("contract_write_only", Fitted(), layer=1).apply(tiny_bundle), hooked(record):
        forward(tiny_bundle, ids)
    torch.testing.assert_close(seen[2], seen[1], rtol=0, atol=0)  # block 1 added nothing to the residual
    assert no_hooks_left(tiny_bundle)


def test_a_plugin_with_none_of_the_three_fails_at_definition():
    with pytest.raises(InterventionError, match=re.escape(
            "intervention 'contract_nothing' defines none of residual_edit, write_edit, hook_specs; implement one")):
        class Nothing(Intervention):
            name = "contract_nothing"
            description = "Test plugin that forgot its edit."
    assert "contract_nothing" not in available()


def test_an_unnamed_class_with_none_fails_at_instantiation():
    class Unnamed(Intervention):
        description = "No name, no edit."

    with pytest.raises(InterventionError, match="intervention 'Unnamed' defines none of residual_edit, write_edit, hook_specs"):
        Unnamed({}, Fitted())


def test_a_plugin_file_with_none_names_its_file(tmp_path):
    (tmp_path / "forgetful.py").write_text(textwrap.dedent('''
        from refusal.interventions import Intervention

        class Forgetful(Intervention):
            name = "contract_forgetful"
    '''))
    with pytest.raises(ConfigError, match=r"forgetful\.py.*'contract_forgetful' defines none of"):
        load_plugin_dir(tmp_path)


def test_the_readme_plugin_example_still_works(tiny_bundle, prompts):
    readme = (REPO / "README.md").read_text()
    example = readme.split("## How to add an intervention", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(example, "README example", "exec"), {"__name__": "readme_example"})
    fitted = Fitted(dim=DiMDirection(torch.randn(tiny_bundle.d_model), layer=1, position=-1))
    ids = tiny_bundle.tokenize_instructions(prompts)
    before = forward(tiny_bundle, ids)
    with make("my_intervention", fitted).apply(tiny_bundle):
        assert not torch.allclose(forward(tiny_bundle, ids), before)
    assert torch.equal(forward(tiny_bundle, ids), before)
