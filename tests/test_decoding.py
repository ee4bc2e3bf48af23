"""The greedy decoding loop against transformers' generate, and the screened head against float32."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from test_scoring import BlockCalls, actadd

import refusal.runtime.decoding as decoding
from refusal.runtime.decoding import GreedyHead
from refusal.runtime.generation import generate


def head_of(weight: torch.Tensor, bias: torch.Tensor | None = None) -> GreedyHead:
    return GreedyHead(weight=weight, bias=bias, screen=weight.bfloat16(), max_row_norm=float(weight.norm(dim=-1).max()),
                      softcap=None, version=(0, 0))


def test_screened_argmax_is_the_float32_argmax_even_below_bfloat16_resolution():
    gen = torch.Generator().manual_seed(0)
    vocab, d = 4000, 96
    weight = torch.randn(vocab, d, generator=gen)
    hidden = 8 * torch.randn(64, d, generator=gen)
    # Near ties: for each row, a runner-up token whose logit is the winner's minus 1e-3 (far below the
    # bfloat16 spacing of logits this size, ~0.06, far above float32's, ~1e-6).
    exact = hidden @ weight.T
    winners = exact.argmax(-1)
    for row, j in enumerate(winners.tolist()[:32]):
        rival = (row * 37 + 11) % vocab
        h = hidden[row]
        weight[rival] = weight[j] - (1e-3 / h.dot(h)) * h  # logit(rival) = logit(j) - 1e-3 for this row
        exact = hidden @ weight.T
    head = head_of(weight)
    torch.testing.assert_close(head.argmax(hidden), exact.argmax(-1), rtol=0, atol=0)
    # with a bias too
    bias = torch.randn(vocab, generator=gen)
    torch.testing.assert_close(head_of(weight, bias).argmax(hidden), (exact + bias).argmax(-1), rtol=0, atol=0)


def test_screened_argmax_breaks_exact_ties_by_the_lowest_index():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(500, 32, generator=gen)
    hidden = torch.randn(4, 32, generator=gen)
    top = (hidden @ weight.T).argmax(-1)
    for row, j in enumerate(top.tolist()):
        twin = (j + 1 + row) % 250  # a lower or higher index holding the same row
        weight[twin] = weight[j]
    exact = hidden @ weight.T
    want = torch.stack([(exact[r] == exact[r].max()).nonzero()[0, 0] for r in range(4)])
    torch.testing.assert_close(head_of(weight).argmax(hidden), want, rtol=0, atol=0)


def test_the_screening_bound_covers_the_bfloat16_error():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(3000, 256, generator=gen) * torch.rand(3000, 1, generator=gen) * 3
    hidden = 50 * torch.randn(16, 256, generator=gen)
    approx = torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16()).float()
    exact = hidden.double() @ weight.double().T
    bound = head_of(weight).error_bound(hidden)
    assert ((approx.double() - exact).abs() <= bound.double()[:, None]).all()
    # and it is not vacuous: the screen keeps few candidates per row
    best = approx.max(-1).values
    assert (approx >= (best - 2 * bound)[:, None]).sum(-1).float().mean() < 300


def test_rows_whose_candidates_overflow_the_screen_are_computed_whole(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    weight = torch.nn.functional.normalize(torch.randn(200, 16, generator=gen), dim=-1)
    hidden = torch.randn(6, 16, generator=gen)
    weight[:40] = weight[0]  # 40 tokens share row 0's logit in every row: more than SCREEN_TOP candidates
    hidden[:3] = weight[0] * 5  # rows 0-2 prefer them: token 0 (the lowest index) must win
    exact = hidden @ weight.T
    head = head_of(weight)
    calls = []
    monkeypatch.setattr(GreedyHead, "logits", lambda self, h: calls.append(len(h)) or h @ self.weight.T)
    torch.testing.assert_close(head.argmax(hidden), exact.argmax(-1), rtol=0, atol=0)
    assert head.argmax(hidden)[:3].tolist() == [0, 0, 0] and calls and calls[0] >= 3


@pytest.fixture(params=[True, False], ids=["screened", "float32-head"])
def screen(request, monkeypatch, tiny_with_system):
    monkeypatch.setattr(decoding, "bf16_is_fast", lambda device: request.param)
    tiny_with_system.memo.pop("greedy_head", None)
    yield request.param
    tiny_with_system.memo.pop("greedy_head", None)


def _planted_eos(bundle, ids) -> int:
    """A token the reference emits mid-completion in some rows but not all: declared end-of-turn, rows
    then finish at different steps (and leave the batch)."""
    free = generate(bundle, ids, max_new_tokens=8, batch_size=len(ids), progress=False, engine="transformers")
    counts = Counter(t for row in free.completion_ids for t in set(row[1:6]))
    return next(t for t, c in counts.most_common() if c < len(ids))


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("positions", [None, "prompt"])
def test_greedy_decode_equals_transformers_generate(tiny_with_system, prompts, screen, positions, share_prefix, monkeypatch):
    bundle = tiny_with_system
    ids = bundle.tokenize_instructions(prompts * 3)
    steer = actadd(bundle, coeff=-2.0, positions=positions) if positions else None
    with steer.apply(bundle) if steer else contextlib.nullcontext():
        monkeypatch.setitem(bundle.extra, "eos_token_ids", [_planted_eos(bundle, ids)])
    monkeypatch.setattr(decoding, "DROP_SHARE", 0.01)  # drop finished rows at once
    runs = {}
    for engine in ("refusal", "transformers"):
        with steer.apply(bundle) if steer else contextlib.nullcontext(), BlockCalls(bundle) as calls:
            runs[engine] = generate(bundle, ids, max_new_tokens=8, batch_size=len(ids), progress=False,
                                    engine=engine, share_prefix=share_prefix)
        runs[engine + "_rows"] = calls.rows
    ours, theirs = runs["refusal"], runs["transformers"]
    assert ours.completion_ids == theirs.completion_ids
    assert ours.completions == theirs.completions
    torch.testing.assert_close(ours.first_logits, theirs.first_logits, atol=1e-5, rtol=1e-5)
    assert len({len(c) for c in ours.completion_ids}) > 1  # rows finished at different steps...
    assert runs["refusal_rows"] < runs["transformers_rows"]  # ...and left the batch
    if steer:
        unsteered = generate(bundle, ids, max_new_tokens=1, batch_size=len(ids), progress=False)
        assert (ours.first_logits - unsteered.first_logits).abs().max() > 1e-2  # the steering acted


def test_decoding_steps_never_use_cudnn_attention(tiny_with_system, prompts):
    """cuDNN attention rebuilds its graph for every key length: each step would pay milliseconds of host time
    (15x slower decoding on an H200). Every forward pass of the loop runs with it off; it is restored after."""
    bundle = tiny_with_system
    seen: list[bool] = []
    block = bundle.layout.blocks[0]
    handle = block.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        before = torch.backends.cuda.cudnn_sdp_enabled()
        generate(bundle, bundle.tokenize_instructions(prompts), max_new_tokens=4, batch_size=8, progress=False)
    finally:
        handle.remove()
    assert len(seen) >= 4 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
