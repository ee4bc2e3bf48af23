"""DiM candidates and selection on a tiny model with a planted refusal mechanism."""

from __future__ import annotations

import pytest
import torch
from conftest import random_unit

from refusal.fitting.dim import (
    CandidateScorer,
    SelectionConfig,
    SelectionResult,
    dim_candidates,
    eligible_layers,
    picks_by_rule,
    select_direction,
)
from refusal.models import load_model
from refusal.runtime.hooks import HookSpec, hooked
from refusal.runtime.prefix import common_prefix

PLANT_LAYER = 3
TRIGGER = "<|endoftext|>"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 6-layer tiny model that 'refuses' along a known direction r̂ when a prompt is harmful.

    A hook at the input of block PLANT_LAYER adds c·r̂ to every position of prompts that contain a
    trigger token (our stand-in for 'the model recognised harm'), and the unembedding rows of the
    refusal tokens point along r̂, so refusal log-odds rise with the r̂ component of the residual.
    The plant sees a whole row at once, so with a shared prompt prefix (the scorer's default) the
    prefix runs unplanted; selection must still find r̂ from the instruction's own tokens.
    """
    bundle = load_model({"name": "planted", "source": "tiny", "tiny": {"n_layers": 6, "seed": 3}},
                        tmp_path_factory.mktemp("cache"))
    unit = random_unit(bundle.d_model, 11)
    planted_unit = unit.to(bundle.device)  # the model's device (a GPU where there is one); the tests compare on the CPU
    trigger_id = bundle.tokenizer.convert_tokens_to_ids(TRIGGER)
    flags = {}
    with torch.no_grad():
        bundle.model.lm_head.weight[bundle.refusal_token_ids] = 6.0 * planted_unit

    def remember(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        flags["harmful"] = (ids == trigger_id).any(-1)

    bundle.model.get_input_embeddings().register_forward_pre_hook(remember, with_kwargs=True)

    def plant(x):
        return x + 8.0 * flags["harmful"].to(x.dtype)[:, None, None] * planted_unit

    handle = hooked([HookSpec(bundle.layout.blocks[PLANT_LAYER], plant, "pre")])
    handle.__enter__()
    yield bundle, unit
    handle.__exit__(None, None, None)


def _instructions(n: int, harmful: bool) -> list[str]:
    topics = ["bread", "rivers", "poems", "python", "rome", "tea", "stars", "chess", "maps", "birds"]
    return [f"Tell me about {topics[i % 10]} number {i}." + (f" {TRIGGER}" if harmful else "") for i in range(n)]


def test_candidates_are_class_mean_differences():
    harmful, harmless = torch.randn(7, 5, 3, 16), torch.randn(9, 5, 3, 16)
    cand = dim_candidates(harmful, harmless)
    assert cand.shape == (5, 3, 16)
    torch.testing.assert_close(cand[2, 1], harmful[:, 2, 1].mean(0) - harmless[:, 2, 1].mean(0))


@pytest.mark.parametrize(("n_layers", "kept"), [
    # refusal_direction's filter_fn drops layer >= int(n_layer * (1.0 - 0.2)); worked by hand:
    (24, 19),  # 24 * 0.8 = 19.2 -> layers 0..18 (qwen05; the old rule kept L19 too)
    (28, 22),  # 22.4 -> 0..21 (qwen15: L22, the old published pick, is excluded)
    (30, 24),  # 24.0 exactly -> 0..23 (smollm2)
    (18, 14),  # 14.4 -> 0..13 (gemma3_270m)
    (26, 20),  # 20.8 -> 0..19 (gemma-2-2b)
    (32, 25),  # 25.6 -> 0..24 (llama-3-8b)
    (5, 4),    # 4.0 -> 0..3
])
def test_eligible_layers_are_the_reference_prune_rule(n_layers, kept):
    assert eligible_layers(n_layers, 0.2) == list(range(kept))


def _table(values: list[tuple[float, float, float]]) -> SelectionResult:
    """A one-position score table: (bypass, induce, kl) per layer."""
    t = torch.tensor(values, dtype=torch.float64)
    return SelectionResult(layer=0, position=-1, bypass=t[:, :1], induce=t[:, 1:2], kl=t[:, 2:], baseline_harmful=1.0,
                           baseline_harmless=-2.0, passed_filters=True)


def test_filters_keep_their_boundaries_as_the_reference():
    # refusal_direction drops kl > threshold and steering < threshold: a candidate exactly at either bound stays
    at_bounds = (-5.0, 0.0, 0.1)   # induce == 0 (absolute threshold), KL == 0.1
    plain = (-3.0, 1.0, 0.05)
    below = (-9.0, -1e-9, 0.0)     # the lowest bypass, but induce just under the threshold
    cfg = SelectionConfig(max_kl=0.1, min_induce=0.0)
    assert picks_by_rule(_table([at_bounds, plain, below]), cfg)["absolute"] == "L0P-1"
    over_kl = (-5.0, 0.0, 0.1 + 1e-12)
    assert picks_by_rule(_table([over_kl, plain, below]), cfg)["absolute"] == "L1P-1"
    # relative: the threshold is the unsteered harmless score (-2.0) + min_induce; -2.0 itself passes
    assert picks_by_rule(_table([(-5.0, -2.0, 0.0), plain]), cfg)["relative"] == "L0P-1"
    assert picks_by_rule(_table([(-5.0, -2.0 - 1e-9, 0.0), plain]), cfg)["relative"] == "L1P-1"


def test_selection_kl_is_the_reference_formula():
    from refusal.fitting.dim import _kl_rows

    # p = (1/2, 1/2), q = (1/4, 3/4); refusal_direction's kl_div_fn keeps ε = 1e-6 inside each log:
    # 0.5·(log(0.5+ε) − log(0.25+ε)) + 0.5·(log(0.5+ε) − log(0.75+ε)), worked out to 10 digits
    base = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.25, 0.75]]))
    got = _kl_rows(base, new)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(0.1438404, abs=1e-7)  # 0.14384037; exact KL (no ε) is 0.14384104
    assert _kl_rows(base, base).item() == 0.0


def test_selection_finds_the_planted_direction(planted):
    from refusal.runtime.activations import extract_activations

    bundle, unit = planted
    n_pos = len(bundle.post_instruction_ids)
    tok = bundle.tokenize_instructions
    train_h, train_s = tok(_instructions(8, True)), tok(_instructions(8, False))
    acts_h = extract_activations(bundle, train_h, n_pos, progress=False)
    acts_s = extract_activations(bundle, train_s, n_pos, progress=False)
    candidates = dim_candidates(acts_h, acts_s)[: bundle.n_layers]
    # before the planted layer harmful and harmless differ only by a token; from it on, by 8·r̂
    assert torch.nn.functional.cosine_similarity(candidates[PLANT_LAYER, -1], unit, dim=0) > 0.9
    scorer = CandidateScorer(bundle, tok(_instructions(4, True)[::-1]), tok(_instructions(4, False)[::-1]),
                             batch_size=24, progress=False)
    result = select_direction(candidates, scorer, SelectionConfig(max_kl=10.0, prune_last_fraction=0.2))
    chosen = candidates[result.layer, result.position]
    assert result.layer >= PLANT_LAYER
    assert torch.nn.functional.cosine_similarity(chosen, unit, dim=0) > 0.9
    assert result.passed_filters
    win = result.winner()
    assert win["bypass"] < result.baseline_harmful - 1.0  # ablation removes most of the refusal signal
    assert win["induce"] > result.baseline_harmless + 1.0  # actadd induces it on harmless prompts
    # early-layer candidates (before the plant) do not bypass
    assert torch.nanquantile(result.bypass[:PLANT_LAYER].flatten(), 0.0) > win["bypass"]
    # layer 0 reads the same post-instruction embeddings for every prompt: zero difference, skipped
    assert torch.all(candidates[0].norm(dim=-1) < 1e-6) and result.bypass[0].isnan().all()
    assert result.scored == (len(eligible_layers(bundle.n_layers, 0.2)) - 1) * n_pos


def test_shortlist_scores_fewer_candidates_and_agrees(planted):
    from refusal.runtime.activations import extract_activations

    bundle, unit = planted
    n_pos = len(bundle.post_instruction_ids)
    tok = bundle.tokenize_instructions
    acts_h = extract_activations(bundle, tok(_instructions(8, True)), n_pos, progress=False)
    acts_s = extract_activations(bundle, tok(_instructions(8, False)), n_pos, progress=False)
    candidates = dim_candidates(acts_h, acts_s)[: bundle.n_layers]
    scorer = CandidateScorer(bundle, tok(_instructions(4, True)), tok(_instructions(4, False)), progress=False)
    last = select_direction(candidates, scorer, SelectionConfig(max_kl=10.0, positions="last"))
    short = select_direction(candidates, scorer, SelectionConfig(max_kl=10.0, shortlist=2))
    n_layers = len(eligible_layers(bundle.n_layers, 0.2))
    assert last.scored == n_layers - 1 and last.position == -1  # layer 0 is degenerate
    assert short.scored == n_layers - 1 + 2 * (n_pos - 1)
    for res in (last, short):
        assert torch.nn.functional.cosine_similarity(candidates[res.layer, res.position], unit, dim=0) > 0.9


def assert_prefix_sharing_scores_like_the_plain_path(bundle, harmful: list[str], harmless: list[str]) -> None:
    """Shared by the tiny and the packaged-model test: same bypass/induce/KL per candidate, either path."""
    tok = bundle.tokenize_instructions
    harmful_ids, harmless_ids = tok(harmful), tok(harmless)
    gen = torch.Generator().manual_seed(0)
    directions = 3.0 * torch.randn(5, bundle.d_model, generator=gen)
    layers = [1, 2, 2, bundle.n_layers // 2, bundle.n_layers - 2]
    plain = CandidateScorer(bundle, harmful_ids, harmless_ids, batch_size=6, progress=False, share_prefix=False)
    shared = CandidateScorer(bundle, harmful_ids, harmless_ids, batch_size=6, progress=False)
    assert plain.prefix == [] and len(shared.prefix) >= 2  # the chat template's opening is shared
    assert shared.prefix == harmful_ids[0][: len(shared.prefix)]
    for name, a, b in zip(("bypass", "induce", "kl"), plain.score(directions, layers), shared.score(directions, layers),
                          strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=f"{name} differs with a shared prefix")
    torch.testing.assert_close(torch.tensor(shared.baselines()), torch.tensor(plain.baselines()), atol=2e-5, rtol=1e-4)


def test_prefix_sharing_gives_the_plain_scores(tiny_bundle):
    # not the planted model: its plant sees the whole row (a trigger anywhere), so its prefix is not causal
    assert_prefix_sharing_scores_like_the_plain_path(tiny_bundle, _instructions(3, True), _instructions(5, False)[2:])


def test_common_prefix_leaves_every_row_a_token():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3, 4, 5]]) == [1, 2, 3]
    assert common_prefix([[1, 2], [1, 2, 3]]) == [1]  # [1, 2] must keep one token of its own
    assert common_prefix([[7, 1], [8, 1]]) == [] and common_prefix([]) == []


def _grid(bypass, induce, kl, baseline_harmless: float) -> SelectionResult:
    t = lambda v: torch.tensor(v, dtype=torch.float32)[:, None]  # noqa: E731 - one position per layer
    return SelectionResult(layer=0, position=-1, bypass=t(bypass), induce=t(induce), kl=t(kl),
                           baseline_harmful=0.0, baseline_harmless=baseline_harmless, passed_filters=True)


def test_relative_rule_keeps_weak_refusers_induce_filter():
    # a weak refuser: unsteered harmless score -4; layer 1 raises it to -2 (induces), layer 0 lowers it to -5,
    # layer 2 breaks the model (KL). No candidate's score is above 0, so Arditi's absolute rule falls back
    # to KL only and takes layer 0, whose actadd does not induce refusal at all.
    result = _grid(bypass=[-6.0, -5.0, -9.0], induce=[-5.0, -2.0, 1.0], kl=[0.05, 0.05, 3.0], baseline_harmless=-4.0)
    assert picks_by_rule(result, SelectionConfig()) == {"relative": "L1P-1", "absolute": "L0P-1"}
    cfg = SelectionConfig()
    assert cfg.induce_threshold(-4.0) == -4.0 and SelectionConfig(induce_rule="absolute").induce_threshold(-4.0) == 0.0
    assert SelectionConfig(min_induce=0.5).induce_threshold(-4.0) == -3.5
    with pytest.raises(ValueError, match="relative, absolute"):
        SelectionConfig(induce_rule="median")


def test_selection_records_the_rule_that_decided(planted):
    bundle, _ = planted
    tok = bundle.tokenize_instructions
    from refusal.runtime.activations import extract_activations

    n_pos = len(bundle.post_instruction_ids)
    acts_h = extract_activations(bundle, tok(_instructions(6, True)), n_pos, progress=False)
    acts_s = extract_activations(bundle, tok(_instructions(6, False)), n_pos, progress=False)
    candidates = dim_candidates(acts_h, acts_s)[: bundle.n_layers]
    scorer = CandidateScorer(bundle, tok(_instructions(3, True)), tok(_instructions(3, False)), progress=False)
    relative = select_direction(candidates, scorer, SelectionConfig(max_kl=10.0, positions="last"))
    assert relative.decided_by.startswith("relative rule") and "fallback" not in relative.decided_by
    assert relative.winner()["induce"] > relative.baseline_harmless
    # an absolute threshold no candidate reaches: the fallback is recorded, not hidden
    absolute = select_direction(candidates, scorer, SelectionConfig(max_kl=10.0, positions="last",
                                                                    induce_rule="absolute", min_induce=1e3))
    assert not absolute.passed_filters and "fallback" in absolute.decided_by
