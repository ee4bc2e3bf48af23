"""Interventions: the mathematics of each built-in, hook hygiene, weight export, generation."""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import random_unit
from transformers import AutoModelForCausalLM

from refusal.errors import ConfigError
from refusal.interventions import DiMDirection, Fitted, available, get_intervention, load_plugin_dir
from refusal.interventions.export import export_orthogonalized
from refusal.runtime.hooks import HookSpec, hooked


class FakeINLP:
    """Stand-in *data* (not behaviour) with the fields interventions read from an INLP fit."""

    def __init__(self, d: int, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, k, generator=g))
        self.directions = q.T.contiguous()
        self.mean_harmful = torch.randn(d, generator=g)
        self.mean_harmless = torch.randn(d, generator=g)
        self.center = (self.mean_harmful + self.mean_harmless) / 2


@pytest.fixture
def fitted(tiny_bundle):
    d = tiny_bundle.d_model
    return Fitted(dim=DiMDirection(3.0 * random_unit(d, 1), layer=2, position=-1), inlp=FakeINLP(d, 4), inlp_layer=2)


def make(name: str, fitted: Fitted, **cfg):
    return get_intervention(name)({"name": name, **cfg}, fitted)


def forward(bundle, ids):
    batch = bundle.pad(ids)
    return bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits


def capture_block_inputs(bundle, store):
    """Hooks (registered after an intervention's) that record what every block receives."""
    def rec(x):
        store.append(x.detach().clone())
        return x
    return [HookSpec(b, rec, "pre") for b in bundle.layout.blocks] + [HookSpec(bundle.layout.final_norm, rec, "pre")]


def test_builtins_are_registered():
    assert {"none", "actadd", "dim_ablation", "inlp_nullspace", "inlp_flip"} <= set(available())


def test_unknown_intervention_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="dim_ablation"):
        get_intervention("ablate_everything")


def test_missing_fit_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs fitted"):
        make("inlp_flip", Fitted())


@pytest.mark.parametrize("name", ["actadd", "dim_ablation", "inlp_nullspace", "inlp_flip"])
def test_leaving_the_context_restores_logits_bit_for_bit(tiny_bundle, fitted, prompts, name):
    ids = tiny_bundle.tokenize_instructions(prompts)
    before = forward(tiny_bundle, ids)
    intervention = make(name, fitted)
    with intervention.apply(tiny_bundle):
        during = forward(tiny_bundle, ids)
    assert not torch.allclose(during, before)
    assert torch.equal(forward(tiny_bundle, ids), before)


def test_hooks_removed_even_on_error(tiny_bundle, fitted, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    before = forward(tiny_bundle, ids)
    with pytest.raises(RuntimeError, match="boom"), make("dim_ablation", fitted).apply(tiny_bundle):
        raise RuntimeError("boom")
    assert all(not b._forward_pre_hooks for b in tiny_bundle.layout.blocks)
    assert torch.equal(forward(tiny_bundle, ids), before)


def test_dim_ablation_zeroes_the_direction_everywhere(tiny_bundle, fitted, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    seen: list[torch.Tensor] = []
    unit = fitted.dim.unit
    with make("dim_ablation", fitted).apply(tiny_bundle), hooked(capture_block_inputs(tiny_bundle, seen)):
        forward(tiny_bundle, ids)
    assert len(seen) == tiny_bundle.n_layers + 1
    assert max(float((x @ unit).abs().max()) for x in seen) < 1e-5
    baseline: list[torch.Tensor] = []
    with hooked(capture_block_inputs(tiny_bundle, baseline)):
        forward(tiny_bundle, ids)
    assert max(float((x @ unit).abs().max()) for x in baseline) > 1e-2  # not trivially zero


def test_actadd_shifts_the_mean_by_exactly_c_r(tiny_bundle, fitted, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    layer = fitted.dim.layer
    before, after = [], []
    with hooked([HookSpec(tiny_bundle.layout.blocks[layer], lambda x: before.append(x.clone()) or x, "pre")]):
        forward(tiny_bundle, ids)
    with make("actadd", fitted, coeff=-2.5).apply(tiny_bundle), hooked(
        [HookSpec(tiny_bundle.layout.blocks[layer], lambda x: after.append(x.clone()) or x, "pre")]
    ):
        forward(tiny_bundle, ids)
    shift = after[0].mean(dim=(0, 1)) - before[0].mean(dim=(0, 1))
    torch.testing.assert_close(shift, -2.5 * fitted.dim.direction, rtol=0, atol=1e-5)


def test_inlp_nullspace_is_idempotent_and_keeps_the_nullspace(fitted):
    nullspace = make("inlp_nullspace", fitted, k=3)
    x = torch.randn(50, fitted.inlp.directions.shape[1])
    once = nullspace.transform(x)
    torch.testing.assert_close(nullspace.transform(once), once, rtol=0, atol=1e-5)
    W, mu = fitted.inlp.directions[:3], fitted.inlp.center
    torch.testing.assert_close((once - mu) @ W.T, torch.zeros(50, 3), rtol=0, atol=1e-5)  # rowspace gone
    P = torch.eye(W.shape[1]) - W.T @ W
    torch.testing.assert_close(once @ P, x @ P, rtol=0, atol=1e-5)  # nullspace untouched
    unused = fitted.inlp.directions[3]  # direction 4 is outside k=3: untouched too
    torch.testing.assert_close(once @ unused, x @ unused, rtol=0, atol=1e-5)


def test_inlp_flip_reflects_and_twice_is_identity_on_reflected_coordinates(fitted):
    W, mu = fitted.inlp.directions, fitted.inlp.center
    harmful_side = torch.sign((fitted.inlp.mean_harmful - mu) @ W.T)
    # points whose every rowspace coordinate is on the harmful side: flip (alpha=1) mirrors them all
    coords = harmful_side * torch.rand(20, W.shape[0]).add(0.1)
    noise = torch.randn(20, W.shape[1])
    x = mu + coords @ W + noise @ (torch.eye(W.shape[1]) - W.T @ W)
    to_harmless = make("inlp_flip", fitted, alpha=1.0, target="harmless")
    to_harmful = make("inlp_flip", fitted, alpha=1.0, target="harmful")
    flipped = to_harmless.transform(x)
    torch.testing.assert_close((flipped - mu) @ W.T, -coords, rtol=0, atol=1e-5)  # mirror reflection
    torch.testing.assert_close(to_harmful.transform(flipped), x, rtol=0, atol=1e-5)  # reflecting back restores
    torch.testing.assert_close(to_harmless.transform(flipped), flipped, rtol=0, atol=1e-5)  # already on target side
    half = make("inlp_flip", fitted, alpha=0.5).transform(x)
    torch.testing.assert_close((half - mu) @ W.T, -0.5 * coords, rtol=0, atol=1e-5)


def _recorder(store: list):
    """A pre-hook that records the block input and leaves it unchanged."""
    return lambda x: store.append(x.clone()) or x


def test_transform_matches_the_hook(tiny_bundle, fitted, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    for name in ("actadd", "inlp_nullspace", "inlp_flip"):
        intervention = make(name, fitted)
        raw, hooked_in = [], []
        block = tiny_bundle.layout.blocks[intervention.layer]
        with hooked([HookSpec(block, _recorder(raw), "pre")]):
            forward(tiny_bundle, ids)
        with intervention.apply(tiny_bundle), hooked([HookSpec(block, _recorder(hooked_in), "pre")]):
            forward(tiny_bundle, ids)
        torch.testing.assert_close(hooked_in[0], intervention.transform(raw[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [{"k": 99}, {"k": 0}, {"k": "two"}, {"alpha": "big"}, {"target": "neutral"}, {"center": "origin"}])
def test_bad_inlp_parameters_are_clear_errors(fitted, bad):
    with pytest.raises(ConfigError, match="|".join(bad)):
        make("inlp_flip", fitted, **bad)


def test_layer_out_of_range(tiny_bundle, fitted):
    with pytest.raises(ConfigError, match="out of range"):
        make("actadd", fitted, layer=17).hook_specs(tiny_bundle)


def test_artifact_of_another_dimension_is_refused(tiny_bundle):
    fitted = Fitted(dim=DiMDirection(torch.randn(32), layer=1, position=-1))
    with pytest.raises(ConfigError, match="d_model"):
        make("dim_ablation", fitted).hook_specs(tiny_bundle)


def test_exported_orthogonalized_checkpoint_matches_hooks(tiny_tied_bundle, prompts, tmp_path):
    bundle = tiny_tied_bundle
    fitted = Fitted(dim=DiMDirection(random_unit(bundle.d_model, 3), layer=1, position=-1))
    ids = bundle.tokenize_instructions(prompts)
    with make("dim_ablation", fitted).apply(bundle):
        hooked_logits = forward(bundle, ids)
    folder = export_orthogonalized(bundle, fitted.dim.unit, tmp_path / "ortho")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = bundle.pad(ids)
    with torch.no_grad():
        logits = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    assert (logits - hooked_logits).abs().max() <= 1e-4
    assert not reloaded.config.tie_word_embeddings  # the unembedding kept its original weights
    torch.testing.assert_close(reloaded.lm_head.weight, bundle.model.lm_head.weight)


def test_generation_transforms_every_new_token(tiny_bundle, fitted, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    batch = tiny_bundle.pad(ids)
    seen: list[torch.Tensor] = []
    unit = fitted.dim.unit
    with make("dim_ablation", fitted).apply(tiny_bundle), hooked(capture_block_inputs(tiny_bundle, seen)):
        out = tiny_bundle.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6, min_new_tokens=6,
            do_sample=False, pad_token_id=tiny_bundle.pad_token_id,
        )
    steps = [x for x in seen if x.shape[1] == 1]  # KV-cache decoding steps see one new token each
    assert len(steps) == 5 * (tiny_bundle.n_layers + 1)
    assert max(float((x @ unit).abs().max()) for x in seen) < 1e-5
    # batched left-padded generation with hooks equals each prompt generated alone
    for i, row in enumerate(ids):
        with make("dim_ablation", fitted).apply(tiny_bundle):
            alone = tiny_bundle.model.generate(
                input_ids=torch.tensor([row]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                pad_token_id=tiny_bundle.pad_token_id,
            )
        assert alone[0, len(row):].tolist() == out[i, batch.input_ids.shape[1]:].tolist()


def test_plugin_file_is_discovered(tmp_path):
    (tmp_path / "scaled_actadd.py").write_text(textwrap.dedent('''
        from refusal.runtime.hooks import HookSpec
        from refusal.interventions import Intervention

        class Doubler(Intervention):
            name = "test_doubler"
            description = "Doubles the residual at block 0 (test plugin)."

            def hook_specs(self, bundle):
                return [HookSpec(bundle.layout.blocks[0], lambda x: 2 * x, "pre")]
    '''))
    assert load_plugin_dir(tmp_path) == ["test_doubler"]
    assert available()["test_doubler"].startswith("Doubles")


def test_broken_plugin_names_its_file(tmp_path):
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match="broken.py"):
        load_plugin_dir(tmp_path)


def test_duplicate_plugin_name_names_both_files(tmp_path):
    (tmp_path / "dup.py").write_text(textwrap.dedent('''
        from refusal.interventions import Intervention

        class Again(Intervention):
            name = "actadd"
            def hook_specs(self, bundle):
                return []
    '''))
    with pytest.raises(ConfigError, match="defined twice"):
        load_plugin_dir(tmp_path)
    assert get_intervention("actadd").__module__ == "refusal.interventions.builtin"


@pytest.mark.parametrize("name", ["actadd", "dim_ablation", "inlp_nullspace", "inlp_flip"])
def test_fingerprint_changes_with_config_scope_and_every_fitted_tensor(tiny_bundle, fitted, name):
    n = tiny_bundle.n_layers
    print_ = make(name, fitted).fingerprint(n)
    assert make(name, fitted).fingerprint(n) == print_  # deterministic: cached generations are found again
    assert make(name, fitted, layers="all").fingerprint(n) != print_
    assert make(name, fitted, positions="prompt").fingerprint(n) != print_
    knob = {"actadd": {"coeff": 2.0}, "dim_ablation": {"layer": 1}, "inlp_nullspace": {"k": 2}, "inlp_flip": {"alpha": 2.0}}
    assert make(name, fitted, **knob[name]).fingerprint(n) != print_
    nudged_dim = DiMDirection(fitted.dim.direction + 1e-4, fitted.dim.layer, fitted.dim.position)
    nudged_inlp = FakeINLP(tiny_bundle.d_model, 4)
    nudged_inlp.center = nudged_inlp.center + 1e-4
    changed = {"dim": Fitted(dim=nudged_dim, inlp=fitted.inlp, inlp_layer=2),
               "inlp": Fitted(dim=fitted.dim, inlp=nudged_inlp, inlp_layer=2)}
    assert make(name, changed["dim"]).fingerprint(n) != print_
    assert make(name, changed["inlp"]).fingerprint(n) != print_  # even a tensor this intervention never reads


def test_inlp_edits_read_the_same_from_an_old_artifact_and_match_its_dense_projector(tiny_bundle, prompts, tmp_path):
    """INLP artifacts hold the k×d rows; an old one also holds the d×d P = I − WᵀW. On the tiny model the
    nullspace edit's block input is μ + (x − μ)P with the old file's P, and both edits give the same
    logits whichever format the fit was read from."""
    from refusal.artifacts import save_artifact
    from refusal.fitting.inlp import INLPResult
    d = tiny_bundle.d_model
    fake = FakeINLP(d, 4)
    inlp = INLPResult(fake.directions, [1.0] * 4, [1.0] * 4, fake.mean_harmful, fake.mean_harmless, fake.center, 4, 0.5)
    W64 = inlp.directions.double()
    P = (torch.eye(d, dtype=torch.float64) - W64.T @ W64).float()  # what the old format stored
    inlp.save(tmp_path / "new")
    save_artifact(tmp_path / "old", {**inlp.to_tensors(), "projection": P}, inlp.meta())
    new, old = INLPResult.load(tmp_path / "new"), INLPResult.load(tmp_path / "old")
    dim = DiMDirection(3.0 * random_unit(d, 1), layer=2, position=-1)
    ids = tiny_bundle.tokenize_instructions(prompts)
    for name in ("inlp_nullspace", "inlp_flip"):
        logits = []
        for fit in (new, old):
            with make(name, Fitted(dim=dim, inlp=fit, inlp_layer=2)).apply(tiny_bundle):
                logits.append(forward(tiny_bundle, ids))
        assert torch.equal(*logits), name
    raw, edited = [], []
    nullspace = make("inlp_nullspace", Fitted(dim=dim, inlp=old, inlp_layer=2))
    block = tiny_bundle.layout.blocks[nullspace.layer]
    with hooked([HookSpec(block, _recorder(raw), "pre")]):
        forward(tiny_bundle, ids)
    with nullspace.apply(tiny_bundle), hooked([HookSpec(block, _recorder(edited), "pre")]):
        forward(tiny_bundle, ids)
    mu = old.center.to(raw[0])
    torch.testing.assert_close(edited[0], mu + (raw[0] - mu) @ P.to(raw[0]), rtol=0, atol=1e-5)
