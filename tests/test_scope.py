"""Scope: every intervention hooks exactly the layers and token positions it names."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, random_unit
from test_interventions import FakeINLP, forward

from refusal.errors import ConfigError
from refusal.interventions import DiMDirection, Fitted, get_intervention
from refusal.interventions.scope import (
    GENERATED,
    INSTRUCTION,
    PAD,
    POST_INSTRUCTION,
    Scope,
    at_positions,
    declare_roles,
    resolve_k,
    role_grid,
    token_roles,
)
from refusal.runtime.generation import generate
from refusal.runtime.hooks import HookSpec, hooked


@pytest.fixture
def fitted(tiny_bundle):
    d = tiny_bundle.d_model
    return Fitted(dim=DiMDirection(3.0 * random_unit(d, 1), layer=2, position=-1), inlp=FakeINLP(d, 4), inlp_layer=2)


def make(name: str, fitted: Fitted, **cfg):
    return get_intervention(name, [REPO / "plugins"])({"name": name, **cfg}, fitted)


def hooked_modules(intervention, bundle) -> list[tuple[str, int]]:
    """(where, layer) of every hook: block input, attention write or MLP write."""
    layout = bundle.layout
    names = {id(m): ("block", i) for i, m in enumerate(layout.blocks)}
    names |= {id(m): ("attn", i) for i, m in enumerate(layout.attn_writers)}
    names |= {id(m): ("mlp", i) for i, m in enumerate(layout.mlp_writers)}
    return sorted(names[id(spec.module)] for spec in intervention.hook_specs(bundle))


def test_defaults_keep_each_interventions_reach(tiny_bundle, fitted):
    n = tiny_bundle.n_layers
    everywhere = sorted([("block", i) for i in range(n)] + [("attn", i) for i in range(n)] + [("mlp", i) for i in range(n)])
    assert hooked_modules(make("dim_ablation", fitted), tiny_bundle) == everywhere
    for name in ("actadd", "inlp_nullspace", "inlp_flip"):
        assert hooked_modules(make(name, fitted), tiny_bundle) == [("block", 2)]


@pytest.mark.parametrize("name", ["actadd", "dim_ablation", "inlp_nullspace", "inlp_flip", "random_ablation"])
def test_layer_lists_hook_exactly_those_block_inputs(tiny_bundle, fitted, name):
    assert hooked_modules(make(name, fitted, layers=[3, 0]), tiny_bundle) == [("block", 0), ("block", 3)]
    assert hooked_modules(make(name, fitted, layers="selected", layer=1), tiny_bundle) == [("block", 1)]


def test_projections_at_every_layer_also_project_writes_but_additive_edits_do_not(tiny_bundle, fitted):
    n = tiny_bundle.n_layers
    for name in ("inlp_nullspace", "random_ablation", "dim_ablation"):
        assert len(hooked_modules(make(name, fitted, layers="all"), tiny_bundle)) == 3 * n
    for name in ("actadd", "inlp_flip"):
        assert hooked_modules(make(name, fitted, layers="all"), tiny_bundle) == [("block", i) for i in range(n)]


def test_nullspace_at_every_layer_leaves_no_rowspace_component_anywhere(tiny_bundle, fitted, prompts):
    """Projecting block inputs and writes keeps W(x − μ) = 0 at every block input and at the final norm."""
    ids = tiny_bundle.tokenize_instructions(prompts)
    W, mu = fitted.inlp.directions, fitted.inlp.center
    seen: list[torch.Tensor] = []
    record = [HookSpec(m, lambda x: seen.append(x.clone()) or x, "pre")
              for m in (*tiny_bundle.layout.blocks, tiny_bundle.layout.final_norm)]
    with make("inlp_nullspace", fitted, layers="all").apply(tiny_bundle), hooked(record):
        forward(tiny_bundle, ids)
    assert len(seen) == tiny_bundle.n_layers + 1
    for x in seen:
        assert ((x - mu) @ W.T).abs().max() < 1e-4


def test_role_grid_marks_pad_instruction_template_and_generated():
    roles = role_grid([5, 3], [4, 3], width=6, n_post=2)
    assert roles.tolist() == [
        [PAD, INSTRUCTION, INSTRUCTION, POST_INSTRUCTION, POST_INSTRUCTION, GENERATED],
        [PAD, PAD, PAD, INSTRUCTION, POST_INSTRUCTION, POST_INSTRUCTION],
    ]


def test_position_scope_without_declared_roles_is_a_clear_error():
    fn = at_positions(lambda x: x + 1, "prompt")
    with pytest.raises(RuntimeError, match="token_roles"):
        fn(torch.zeros(1, 3, 2))


def test_a_decoding_step_holds_generated_tokens_only():
    fn = at_positions(lambda x: x + 1, "prompt")
    with token_roles(role_grid([3], [3], 3, 1)):
        assert torch.equal(fn(torch.zeros(1, 3, 2)), torch.ones(1, 3, 2))
        assert torch.equal(fn(torch.zeros(1, 1, 2)), torch.zeros(1, 1, 2))


@pytest.mark.parametrize(("positions", "roles"), [
    ("all", {INSTRUCTION, POST_INSTRUCTION, GENERATED, PAD}),
    ("prompt", {INSTRUCTION, POST_INSTRUCTION}),
    ("post_instruction", {POST_INSTRUCTION}),
])
def test_teacher_forced_forward_edits_exactly_the_positions_in_scope(tiny_bundle, fitted, prompts, positions, roles):
    """actadd adds c·r where the scope says and nowhere else (pads, instruction, completion tokens)."""
    prompt_ids = tiny_bundle.tokenize_instructions(prompts)
    rows = [p + [11, 12, 13] for p in prompt_ids]  # three "completion" tokens after each prompt
    batch = tiny_bundle.pad(rows)
    width = batch.input_ids.shape[1]
    grid = role_grid([len(r) for r in rows], [len(p) for p in prompt_ids], width, len(tiny_bundle.post_instruction_ids))
    intervention = make("actadd", fitted, coeff=2.0, positions=positions)
    block = tiny_bundle.layout.blocks[fitted.dim.layer]
    raw, edited = [], []
    with hooked([HookSpec(block, lambda x: raw.append(x.clone()) or x, "pre")]), intervention.apply(tiny_bundle), \
            hooked([HookSpec(block, lambda x: edited.append(x.clone()) or x, "pre")]), \
            declare_roles(tiny_bundle, [len(r) for r in rows], width, [len(p) for p in prompt_ids]):
        tiny_bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    shift = edited[0] - raw[0]
    in_scope = torch.isin(grid, torch.tensor(sorted(roles)))
    expected = 2.0 * fitted.dim.direction
    torch.testing.assert_close(shift[in_scope], expected.expand(int(in_scope.sum()), -1), rtol=0, atol=1e-5)
    assert shift[~in_scope].abs().max() == 0 if (~in_scope).any() else True


@pytest.mark.parametrize(("positions", "edits_generated"), [("all", True), ("prompt", False)])
def test_generation_includes_or_excludes_generated_tokens(tiny_bundle, fitted, prompts, positions, edits_generated):
    ids = tiny_bundle.tokenize_instructions(prompts[:2])
    block = tiny_bundle.layout.blocks[fitted.dim.layer]
    raw, edited = [], []
    with hooked([HookSpec(block, lambda x: raw.append(x.clone()) or x, "pre")]), \
            make("actadd", fitted, coeff=2.0, positions=positions).apply(tiny_bundle), \
            hooked([HookSpec(block, lambda x: edited.append(x.clone()) or x, "pre")]):
        generate(tiny_bundle, ids, max_new_tokens=4, batch_size=2, progress=False)
    assert raw[0].shape[1] > 1 and len(raw) == 4  # one prefill, three decoding steps
    shift = 2.0 * fitted.dim.direction
    prefill_mask = tiny_bundle.pad(ids).attention_mask.bool()
    torch.testing.assert_close((edited[0] - raw[0])[prefill_mask], shift.expand(int(prefill_mask.sum()), -1), rtol=0, atol=1e-5)
    for before, after in zip(raw[1:], edited[1:], strict=True):
        diff = after - before
        if edits_generated:
            torch.testing.assert_close(diff, shift.expand_as(diff), rtol=0, atol=1e-5)
        else:
            assert diff.abs().max() == 0


@pytest.mark.parametrize(("k", "rank", "expected"), [(3, 10, 3), ("all", 10, 10), (None, 7, 7), (0.25, 40, 10), (0.01, 40, 1), (1.0, 40, 40)])
def test_k_accepts_an_int_all_or_a_fraction_of_the_rank(k, rank, expected):
    assert resolve_k(k, rank) == expected


@pytest.mark.parametrize("k", [0, 11, 1.5, -0.5, 0.0, float("nan"), True, "two"])
def test_bad_k_is_a_clear_error(k):
    with pytest.raises(ConfigError, match="intervention.k"):
        resolve_k(k, 10)


def test_fractional_k_uses_that_share_of_each_layers_fit(tiny_bundle, fitted):
    intervention = make("inlp_flip", fitted, k=0.5)
    assert intervention.k == 2 and intervention.params()["k"] == 2


@pytest.mark.parametrize("layers", ["some", [], [1.5], [True]])
def test_bad_layer_scope_words(layers):
    with pytest.raises(ConfigError, match="intervention.layers"):
        Scope.from_config({"layers": layers})


def test_bad_position_scope_word():
    with pytest.raises(ConfigError, match="intervention.positions='prefix' must be one of"):
        Scope.from_config({"positions": "prefix"})


@pytest.mark.parametrize(("overrides", "message"), [
    (["intervention=actadd", "intervention.layers=[0,9]"], r"intervention.layers has \[9\] out of range .* 4 layers"),
    (["intervention=inlp_flip", "intervention.layers=middle"], "intervention.layers='middle' must be one of"),
    (["intervention=inlp_flip", "intervention.positions=suffix"], "intervention.positions='suffix' must be one of"),
    (["intervention=inlp_flip", "intervention.k=1.5"], r"intervention.k=1.5 must be an int >= 1, 'all', or a fraction"),
    (["intervention=inlp_flip", "intervention.alpha=inf"], "intervention.alpha must be a finite number, got inf"),
    (["intervention=actadd", "intervention.coeff=nan"], "intervention.coeff must be a finite number, got nan"),
    (["intervention=dim_ablation", "intervention.export=true", "intervention.layers=selected"], "export=true"),
    (["fit.inlp.per_layer=maybe"], "fit.inlp.per_layer='maybe' must be true or false"),
])
def test_scope_and_number_errors_come_before_the_model_loads(compose, overrides, message):
    from refusal.config import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(compose(*overrides))


def test_per_layer_inlp_uses_each_layers_own_fit(tiny_bundle, fitted):
    own = {layer: FakeINLP(tiny_bundle.d_model, 3, seed=10 + layer) for layer in (1, 3)}
    per_layer = Fitted(dim=fitted.dim, inlp=fitted.inlp, inlp_layer=2, inlp_by_layer=own)
    intervention = make("inlp_nullspace", per_layer, layers=[1, 3])
    for layer in (1, 3):
        x = torch.randn(5, tiny_bundle.d_model)
        out = intervention.residual_edit(layer, lambda t: t)(x)
        W, mu = own[layer].directions, own[layer].center
        assert ((out - mu) @ W.T).abs().max() < 1e-5  # that layer's rowspace, about that layer's centre
    with pytest.raises(ConfigError, match="no per-layer INLP fit for layer 0"):
        make("inlp_nullspace", per_layer, layers=[0, 1]).hook_specs(tiny_bundle)


def test_random_subspace_is_orthonormal_and_ablated(tiny_bundle, fitted):
    intervention = make("random_ablation", fitted, k=5, seed=3)
    Q = intervention.basis
    torch.testing.assert_close(Q @ Q.T, torch.eye(5), rtol=0, atol=1e-5)
    x = torch.randn(7, tiny_bundle.d_model)
    assert ((intervention.transform(x) - fitted.inlp.center) @ Q.T).abs().max() < 1e-5  # about INLP's centre (default)
    assert torch.equal(make("random_ablation", fitted, k=5, seed=3).basis, Q)  # reproducible per seed
