"""DiM candidates and selection on a tiny model with a planted refusal mechanism."""

from __future__ import annotations

import pytest
import torch
from conftest import random_unit

from refusal.fitting.dim import (
    CandidateScorer,
    SelectionConfig,
    dim_candidates,
    eligible_layers,
    select_direction,
)
from refusal.hooks import HookSpec, hooked
from refusal.models import load_model

PLANT_LAYER = 3
TRIGGER = "<|endoftext|>"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 6-layer tiny model that 'refuses' along a known direction r̂ when a prompt is harmful.

    A hook at the input of block PLANT_LAYER adds c·r̂ to every position of prompts that contain a
    trigger token (our stand-in for 'the model recognised harm'), and the unembedding rows of the
    refusal tokens point along r̂, so refusal log-odds rise with the r̂ component of the residual.
    """
    bundle = load_model({"name": "planted", "source": "tiny", "tiny": {"n_layers": 6, "seed": 3}},
                        tmp_path_factory.mktemp("cache"))
    unit = random_unit(bundle.d_model, 11)
    trigger_id = bundle.tokenizer.convert_tokens_to_ids(TRIGGER)
    flags = {}
    with torch.no_grad():
        bundle.model.lm_head.weight[bundle.refusal_token_ids] = 6.0 * unit

    def remember(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        flags["harmful"] = (ids == trigger_id).any(-1)

    bundle.model.get_input_embeddings().register_forward_pre_hook(remember, with_kwargs=True)

    def plant(x):
        return x + 8.0 * flags["harmful"].to(x.dtype)[:, None, None] * unit

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


def test_eligible_layers_drop_the_last_fifth():
    assert eligible_layers(24, 0.2) == list(range(20))
    assert eligible_layers(5, 0.2) == list(range(4))


def test_selection_finds_the_planted_direction(planted):
    from refusal.activations import extract_activations

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
    from refusal.activations import extract_activations

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
