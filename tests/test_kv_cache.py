"""The reserved key/value cache: the same tensors as transformers' DynamicLayer, without per-step copies."""

from __future__ import annotations

import torch
from test_decoding import _planted_eos
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

import refusal.runtime.decoding as decoding
from refusal.runtime.generation import generate, truncated
from refusal.runtime.kv_cache import ReservedLayer, reserve


def states(gen: torch.Generator, batch: int = 3, seq: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 2, seq, 4, generator=gen), torch.randn(batch, 2, seq, 4, generator=gen)


def test_updates_past_the_reserve_match_dynamic_layer_step_for_step():
    gen = torch.Generator().manual_seed(0)
    keys, values = states(gen)
    plain = DynamicLayer()
    plain.update(keys, values)
    reserved = ReservedLayer(keys, values, reserve=2)
    for width in (1, 1, 1, 3, 1):  # the fourth step outgrows the reserve of 2; the fifth adds 3 at once
        k, v = states(gen, seq=width)
        want, got = plain.update(k, v), reserved.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert reserved.get_seq_length() == plain.get_seq_length()
    assert reserved.get_mask_sizes(1) == plain.get_mask_sizes(1)


def test_selecting_rows_then_updating_keeps_the_selected_rows_history():
    gen = torch.Generator().manual_seed(1)
    keys, values = states(gen, batch=4)
    plain, reserved = DynamicLayer(), ReservedLayer(keys, values, reserve=8)
    plain.update(keys, values)
    keep = torch.tensor([3, 0])
    plain.batch_select_indices(keep)
    reserved.batch_select_indices(keep)
    k, v = states(gen, batch=2, seq=1)
    want, got = plain.update(k, v), reserved.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    reserved.crop(-2)
    assert torch.equal(reserved.keys, want[0][:, :, :-2])


def test_reserve_converts_full_attention_layers_only():
    gen = torch.Generator().manual_seed(2)
    keys, values = states(gen)
    sliding = DynamicSlidingWindowLayer(sliding_window=4)
    cache = DynamicCache()
    cache.layers = [DynamicLayer(), sliding, DynamicLayer()]
    cache.layers[0].update(keys, values)
    sliding.update(keys, values)
    reserve(cache, 16)
    assert type(cache.layers[0]) is ReservedLayer and torch.equal(cache.layers[0].keys, keys)
    assert cache.layers[1] is sliding
    assert type(cache.layers[2]) is DynamicLayer  # never filled: nothing to reserve


def test_decoding_with_the_reserved_cache_is_bit_identical(tiny_with_system, prompts, monkeypatch):
    bundle = tiny_with_system
    ids = bundle.tokenize_instructions(prompts * 3)
    monkeypatch.setitem(bundle.extra, "eos_token_ids", [_planted_eos(bundle, ids)])
    monkeypatch.setattr(decoding, "DROP_SHARE", 0.01)  # finished rows leave at once: the cache's rows are selected
    with_reserve = generate(bundle, ids, max_new_tokens=12, batch_size=len(ids), progress=False)
    monkeypatch.setattr(decoding, "reserve", lambda cache, tokens: cache)
    plain = generate(bundle, ids, max_new_tokens=12, batch_size=len(ids), progress=False)
    assert len({len(c) for c in plain.completion_ids}) > 1  # rows finished at different steps
    assert with_reserve.completion_ids == plain.completion_ids
    assert torch.equal(with_reserve.first_logits, plain.first_logits)


def test_a_longer_generation_cut_to_a_budget_is_the_generation_at_that_budget(tiny_with_system, prompts, monkeypatch):
    """eval.generate_new_tokens: greedy decoding at a budget is the prefix of a longer one, so a length curve can be
    judged on cuts of one generation; rows that ended before the cut are kept whole."""
    bundle = tiny_with_system
    ids = bundle.tokenize_instructions(prompts * 3)
    monkeypatch.setitem(bundle.extra, "eos_token_ids", [_planted_eos(bundle, ids)])
    longer = generate(bundle, ids, max_new_tokens=12, batch_size=len(ids), progress=False)
    for budget in (1, 4, 7):
        direct = generate(bundle, ids, max_new_tokens=budget, batch_size=len(ids), progress=False)
        cut = truncated(longer, budget, bundle.tokenizer)
        assert cut.completion_ids == direct.completion_ids
        assert cut.completions == direct.completions
        assert torch.equal(cut.first_logits, direct.first_logits)
    cut = truncated(longer, 4, bundle.tokenizer)
    assert any(len(row) < 4 for row in cut.completion_ids) and any(len(row) == 4 for row in cut.completion_ids)
    assert any(len(row) > 4 for row in longer.completion_ids)  # some rows were really cut
