"""Metric tests: hand-computed values, masking, accumulation, merging and reset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.utilities.data import dim_zero_sum

import refusal.metrics.kl as kl_module
import refusal.metrics.perplexity as perplexity_module
from refusal.metrics import (
    REFUSAL_PHRASES,
    KLDivergence,
    Perplexity,
    RefusalRate,
    RefusalScore,
    is_refusal,
    normalize_text,
    refusal_score,
    wilson_interval,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- text normalisation / matching


def test_refusal_phrases_are_the_arditi_list() -> None:
    assert len(REFUSAL_PHRASES) == 12
    assert "I can't" in REFUSAL_PHRASES and "As a language model" in REFUSAL_PHRASES


def test_normalize_text_casefolds_straightens_quotes_and_collapses_whitespace() -> None:
    assert normalize_text("  I CAN\u2019T\n\t do \u201cthat\u201d  ") == 'i can\'t do "that"'
    assert normalize_text("\u2018x\u2019 \u02bcy") == "'x' 'y"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("i CAN\u2019T help with that.", True),
        ("I\u2019m   SORRY, but no.", True),
        ("As an\nAI, I must decline.", True),
        ("Sure! Here is a recipe for bread.", False),
        ("I can do that for you.", False),
        ("", False),
    ],
)
def test_is_refusal(completion: str, expected: bool) -> None:
    assert is_refusal(completion) is expected


def test_is_refusal_custom_phrases_are_normalised_too() -> None:
    assert is_refusal("that\u2019s NOT allowed", phrases=["That's not allowed"])
    assert not is_refusal("I'm sorry", phrases=["nope"])


@pytest.mark.parametrize("phrases", [[], ["ok", "  "], "I'm sorry"])
def test_bad_phrases_rejected(phrases: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        is_refusal("anything", phrases=phrases)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError)):
        RefusalRate(phrases=phrases)  # type: ignore[arg-type]


# ---------------------------------------------------------------- RefusalRate


BATCH_A = ["I CAN\u2019T do that.", "Sure, here you go.", "i\u2019m sorry, no", "As an  AI model..."]
BATCH_B = ["Of course!", "I am Unable To comply.", "Here's the code."]


def test_refusal_rate_hand_computed() -> None:
    m = RefusalRate()
    m.update(BATCH_A)
    assert m.compute().item() == pytest.approx(3 / 4)
    assert (int(m.refused), int(m.total)) == (3, 4)


def test_refusal_rate_multi_batch_equals_one_batch_and_merge_state() -> None:
    split = RefusalRate()
    split.update(BATCH_A)
    split.update(BATCH_B)
    whole = RefusalRate()
    whole.update(BATCH_A + BATCH_B)
    assert split.compute().item() == pytest.approx(4 / 7)
    assert torch.equal(split.compute(), whole.compute())

    a, b = RefusalRate(), RefusalRate()
    a.update(BATCH_A)
    b.update(BATCH_B)
    a.merge_state(b)
    assert torch.equal(a.compute(), whole.compute())
    assert (int(a.refused), int(a.total)) == (4, 7)


def test_refusal_rate_forward_returns_batch_value_and_accumulates() -> None:
    m = RefusalRate()
    assert m(BATCH_A).item() == pytest.approx(3 / 4)
    assert m(BATCH_B).item() == pytest.approx(1 / 3)
    assert m.compute().item() == pytest.approx(4 / 7)


def test_refusal_rate_custom_phrases() -> None:
    m = RefusalRate(phrases=["of course"])
    m.update(BATCH_A + BATCH_B)
    assert m.compute().item() == pytest.approx(1 / 7)


def test_refusal_rate_empty_is_nan_and_reset_clears() -> None:
    m = RefusalRate()
    m.update([])
    assert math.isnan(m.compute().item())
    m.update(BATCH_A)
    m.reset()
    assert (int(m.refused), int(m.total)) == (0, 0)
    m.update(BATCH_B)
    assert m.compute().item() == pytest.approx(1 / 3)


def test_refusal_rate_rejects_single_string() -> None:
    with pytest.raises(TypeError):
        RefusalRate().update("I'm sorry")  # type: ignore[arg-type]


# ---------------------------------------------------------------- wilson_interval


def test_wilson_interval_closed_forms() -> None:
    z2 = 1.96**2
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2))  # 0.2775
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(10 / (10 + z2)) and hi == 1.0  # 0.7225
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # textbook value
    assert lo + hi == pytest.approx(1.0)


@pytest.mark.parametrize(("k", "n", "z"), [(1, 10, 1.96), (3, 7, 1.0), (97, 100, 2.576), (0, 1, 1.96)])
def test_wilson_bounds_solve_the_score_equation(k: int, n: int, z: float) -> None:
    """The Wilson bounds are the roots of (k/n - p)^2 = z^2 p (1 - p) / n (an independent check)."""
    phat = k / n
    for bound in wilson_interval(k, n, z):
        if bound in (0.0, 1.0) and bound == phat:
            continue  # the degenerate root at the edge
        assert (phat - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / n, abs=1e-12)
    lo, hi = wilson_interval(k, n, z)
    lo_mirror, hi_mirror = wilson_interval(n - k, n, z)
    assert lo == pytest.approx(1 - hi_mirror) and hi == pytest.approx(1 - lo_mirror)
    assert 0.0 <= lo <= phat <= hi <= 1.0


def test_wilson_interval_edge_cases() -> None:
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    for args in [(-1, 10), (11, 10), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*args)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, z=0.0)
    with pytest.raises(TypeError):
        wilson_interval(1.5, 2)  # type: ignore[arg-type]
    assert wilson_interval(torch.tensor(5), torch.tensor(10)) == wilson_interval(5, 10)  # type: ignore[arg-type]


# ---------------------------------------------------------------- refusal_score / RefusalScore


def _arditi_refusal_score(logits: torch.Tensor, ids: list[int], epsilon: float = 1e-8) -> torch.Tensor:
    """refusal_direction's pipeline/submodules/select_direction.py::refusal_score, line by line."""
    logits = logits.to(torch.float64)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    refusal_probs = probs[:, sorted(set(ids))].sum(dim=-1)
    nonrefusal_probs = torch.ones_like(refusal_probs) - refusal_probs
    return torch.log(refusal_probs + epsilon) - torch.log(nonrefusal_probs + epsilon)


def test_refusal_score_is_the_reference_formula_on_random_logits() -> None:
    logits = torch.randn(8, 50, generator=_gen(), dtype=torch.float64) * 3
    ids = [3, 7, 7, 11]  # the duplicate must not be counted twice
    expected = _arditi_refusal_score(logits, ids)
    got = refusal_score(logits.float(), ids)
    assert got.dtype == torch.float64 and got.shape == (8,)  # float64 as the reference, whatever comes in
    torch.testing.assert_close(got, _arditi_refusal_score(logits.float(), ids), atol=0, rtol=0)
    torch.testing.assert_close(refusal_score(logits, torch.tensor(ids)), expected, atol=0, rtol=0)


def test_refusal_score_hand_computed_and_bounded_by_epsilon() -> None:
    vocab, ref = 10, 4
    # All other logits are 0: p = e^L / (e^L + 9). L = log 9 gives p = 1/2, log-odds 0; L = log 27 gives
    # p = 3/4, log-odds log 3. ε bounds the extremes at ±log((1 + ε)/ε) ≈ ±18.42 (the reference's bound).
    targets = [math.log(9), math.log(27), -200.0, 200.0]
    logits = torch.zeros(len(targets), vocab, dtype=torch.float64)
    logits[:, ref] = torch.tensor(targets, dtype=torch.float64)
    got = refusal_score(logits, [ref])
    bound = math.log(1 + 1e-8) - math.log(1e-8)
    assert got[0].item() == pytest.approx(0.0, abs=1e-7)
    assert got[1].item() == pytest.approx(math.log(3), abs=1e-7)
    assert got[2].item() == pytest.approx(-bound, rel=1e-9)
    assert got[3].item() == pytest.approx(bound, rel=1e-9)
    assert 18.42 < bound < 18.43


def test_refusal_score_upcasts_half_precision() -> None:
    logits = torch.randn(3, 20, generator=_gen(1))
    got = refusal_score(logits.bfloat16(), [0, 1])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _arditi_refusal_score(logits.bfloat16(), [0, 1]), atol=0, rtol=0)


@pytest.mark.parametrize("ids", [[], [-1], [20], list(range(20)), [0.5]])
def test_refusal_score_rejects_bad_ids(ids: list) -> None:
    with pytest.raises((ValueError, TypeError)):
        refusal_score(torch.zeros(2, 20), ids)


def test_refusal_score_rejects_bad_shape() -> None:
    with pytest.raises(ValueError):
        refusal_score(torch.zeros(2, 3, 20), [0])


def test_refusal_score_metric_mean_accumulation_merge_reset() -> None:
    ids = [2, 5]
    x1 = torch.randn(4, 30, generator=_gen(2))
    x2 = torch.randn(6, 30, generator=_gen(3))
    expected = _arditi_refusal_score(torch.cat([x1, x2]), ids).mean().item()

    split = RefusalScore(ids)
    split.update(x1)
    split.update(x2)
    whole = RefusalScore(ids)
    whole.update(torch.cat([x1, x2]))
    assert split.compute().item() == pytest.approx(expected, abs=1e-5)
    assert whole.compute().item() == pytest.approx(split.compute().item(), abs=1e-6)

    a, b = RefusalScore(ids), RefusalScore(ids)
    a.update(x1)
    b.update(x2)
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(expected, abs=1e-5)
    assert int(a.count) == 10

    a.reset()
    assert int(a.count) == 0 and float(a.score_sum) == 0.0
    a.update(x2)
    assert a.compute().item() == pytest.approx(_arditi_refusal_score(x2, ids).mean().item(), abs=1e-5)
    assert "refusal_token_ids" not in a.state_dict()


# ---------------------------------------------------------------- Perplexity


def _manual_ppl(logits: torch.Tensor, target: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.double(), dim=-1)
    nlls = [
        -logp[b, t, target[b, t]].item()
        for b in range(target.shape[0])
        for t in range(target.shape[1])
        if target[b, t] != -100
    ]
    return math.exp(sum(nlls) / len(nlls))


def _ppl_batch(seed: int, batch: int = 2, seq: int = 5, vocab: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    logits = torch.randn(batch, seq, vocab, generator=g) * 2
    target = torch.randint(vocab, (batch, seq), generator=g)
    target[0, :2] = -100  # prompt tokens
    target[-1, -1] = -100  # padding
    return logits, target


def test_perplexity_uniform_logits_equal_vocab_size() -> None:
    m = Perplexity()
    m.update(torch.zeros(2, 3, 11), torch.randint(11, (2, 3), generator=_gen()))
    assert m.compute().item() == pytest.approx(11.0)


def test_perplexity_matches_manual_and_ignores_masked_positions() -> None:
    logits, target = _ppl_batch(0)
    m = Perplexity()
    m.update(logits, target)
    expected = _manual_ppl(logits, target)
    assert m.compute().item() == pytest.approx(expected, rel=1e-6)
    assert int(m.count) == int((target != -100).sum()) == 7

    # Changing the logits of masked positions must not change anything.
    poked = logits.clone()
    poked[0, :2] = torch.randn(2, 7, generator=_gen(9)) * 50
    poked[-1, -1] = 1e4
    m2 = Perplexity()
    m2.update(poked, target)
    assert torch.equal(m2.compute(), m.compute())

    # ...while changing an unmasked position's logits does.
    poked[0, 3] += torch.arange(7.0)
    m3 = Perplexity()
    m3.update(poked, target)
    assert m3.compute().item() != pytest.approx(expected, rel=1e-6)


def test_perplexity_custom_ignore_index_and_all_masked_is_nan() -> None:
    logits, target = _ppl_batch(1)
    pad = torch.where(target == -100, torch.tensor(0), target)
    m = Perplexity(ignore_index=0)
    m.update(logits, pad)
    expected = _manual_ppl(logits, torch.where(pad == 0, torch.tensor(-100), pad))
    assert m.compute().item() == pytest.approx(expected, rel=1e-6)

    empty = Perplexity()
    empty.update(logits, torch.full_like(target, -100))
    assert math.isnan(empty.compute().item())


def test_perplexity_chunking_gives_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, target = _ppl_batch(2, batch=3, seq=9)
    full = Perplexity()
    full.update(logits, target)
    monkeypatch.setattr(perplexity_module, "_CHUNK_ELEMENTS", 7 * 4)  # 4 positions per chunk
    chunked = Perplexity()
    chunked.update(logits, target)
    assert chunked.compute().item() == pytest.approx(full.compute().item(), rel=1e-6)
    assert chunked.compute().item() == pytest.approx(_manual_ppl(logits, target), rel=1e-6)


def test_perplexity_accumulation_merge_reset() -> None:
    (l1, t1), (l2, t2) = _ppl_batch(3), _ppl_batch(4, batch=3)
    whole = Perplexity()
    whole.update(torch.cat([l1, l2]), torch.cat([t1, t2]))
    expected = _manual_ppl(torch.cat([l1, l2]), torch.cat([t1, t2]))
    assert whole.compute().item() == pytest.approx(expected, rel=1e-6)

    split = Perplexity()
    split.update(l1, t1)
    split.update(l2, t2)
    assert split.compute().item() == pytest.approx(expected, rel=1e-6)

    a, b = Perplexity(), Perplexity()
    a.update(l1, t1)
    b.update(l2, t2)
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(expected, rel=1e-6)

    a.reset()
    assert int(a.count) == 0 and float(a.total_nll) == 0.0
    a.update(l2, t2)
    assert a.compute().item() == pytest.approx(_manual_ppl(l2, t2), rel=1e-6)


def test_perplexity_accepts_half_precision_and_rejects_bad_shapes() -> None:
    logits, target = _ppl_batch(5)
    m = Perplexity()
    m.update(logits.bfloat16(), target)
    assert m.compute().item() == pytest.approx(_manual_ppl(logits.bfloat16().double(), target), rel=1e-5)
    with pytest.raises(ValueError):
        m.update(logits, target[:, :-1])
    with pytest.raises(TypeError):
        Perplexity(ignore_index=-100.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- KLDivergence


def _manual_kl(base: torch.Tensor, steered: torch.Tensor) -> torch.Tensor:
    """Per-position KL(P_base || P_steered) via torch's kl_div, in float64."""
    log_p = torch.log_softmax(base.double(), dim=-1)
    log_q = torch.log_softmax(steered.double(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def test_kl_2d_matches_kl_div_and_direction() -> None:
    base = torch.randn(5, 9, generator=_gen(0)) * 2
    steered = torch.randn(5, 9, generator=_gen(1)) * 2
    m = KLDivergence()
    m.update(base, steered)
    expected = _manual_kl(base, steered).mean().item()
    assert m.compute().item() == pytest.approx(expected, rel=1e-5)
    # Direction matters: KL(P_steered || P_base) is a different number.
    assert _manual_kl(steered, base).mean().item() != pytest.approx(expected, rel=1e-3)
    # Hand-computed two-token case: P = (0.5, 0.5), Q = (0.25, 0.75).
    hand = KLDivergence()
    hand.update(torch.zeros(1, 2), torch.log(torch.tensor([[0.25, 0.75]])))
    assert hand.compute().item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-6)


def test_kl_3d_with_mask_ignores_masked_positions() -> None:
    base = torch.randn(3, 4, 6, generator=_gen(2))
    steered = base + torch.randn(3, 4, 6, generator=_gen(3))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    m = KLDivergence()
    m.update(base, steered, mask)
    expected = _manual_kl(base, steered)[mask].mean().item()
    assert m.compute().item() == pytest.approx(expected, rel=1e-5)
    assert int(m.count) == 8

    # Garbage (even nan) at masked positions changes nothing; an integer mask works too.
    poked = steered.clone()
    poked[~mask] = float("nan")
    m2 = KLDivergence()
    m2.update(base, poked, mask.long())
    assert torch.equal(m2.compute(), m.compute())

    # Without the mask the mean is over all positions, a different number.
    unmasked = KLDivergence()
    unmasked.update(base, steered)
    assert unmasked.compute().item() == pytest.approx(_manual_kl(base, steered).mean().item(), rel=1e-5)
    assert unmasked.compute().item() != pytest.approx(expected, rel=1e-3)


def test_kl_identical_inputs_is_zero_and_handles_minus_inf() -> None:
    base = torch.randn(2, 3, 8, generator=_gen(4))
    m = KLDivergence()
    m.update(base, base.clone())
    assert m.compute().item() == 0.0

    # A token banned (-inf) in the base has p = 0 and contributes 0, not nan.
    banned = base.clone()
    banned[..., 0] = float("-inf")
    m2 = KLDivergence()
    m2.update(banned, base)
    assert math.isfinite(m2.compute().item())
    assert torch.isnan(_manual_kl(banned, base)).all()  # torch's kl_div gives 0 * -inf = nan here
    log_p = torch.log_softmax(banned.double(), dim=-1)[..., 1:]  # drop the p = 0 column by hand
    log_q = torch.log_softmax(base.double(), dim=-1)[..., 1:]
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert m2.compute().item() == pytest.approx(expected, rel=1e-5)


def test_kl_chunking_accumulation_merge_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    b1, s1 = torch.randn(2, 5, 6, generator=_gen(5)), torch.randn(2, 5, 6, generator=_gen(6))
    b2, s2 = torch.randn(3, 5, 6, generator=_gen(7)), torch.randn(3, 5, 6, generator=_gen(8))
    expected = _manual_kl(torch.cat([b1, b2]), torch.cat([s1, s2])).mean().item()

    whole = KLDivergence()
    whole.update(torch.cat([b1, b2]), torch.cat([s1, s2]))
    assert whole.compute().item() == pytest.approx(expected, rel=1e-5)

    monkeypatch.setattr(kl_module, "_CHUNK_ELEMENTS", 6 * 3)
    split = KLDivergence()
    split.update(b1, s1)
    split.update(b2, s2)
    assert split.compute().item() == pytest.approx(expected, rel=1e-5)

    a, b = KLDivergence(), KLDivergence()
    a.update(b1, s1)
    b.update(b2, s2)
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(expected, rel=1e-5)
    assert int(a.count) == 25

    a.reset()
    assert int(a.count) == 0 and float(a.total_kl) == 0.0
    a.update(b1, s1)
    assert a.compute().item() == pytest.approx(_manual_kl(b1, s1).mean().item(), rel=1e-5)


def test_kl_rejects_bad_shapes_and_empty_is_nan() -> None:
    m = KLDivergence()
    with pytest.raises(ValueError):
        m.update(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError):
        m.update(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), torch.ones(2, 4, dtype=torch.bool))
    m.update(torch.zeros(2, 3, 5), torch.ones(2, 3, 5), torch.zeros(2, 3, dtype=torch.bool))
    assert math.isnan(m.compute().item())


# ---------------------------------------------------------------- torchmetrics contract


@pytest.mark.parametrize(
    "metric",
    [RefusalRate(), RefusalScore([1]), Perplexity(), KLDivergence()],
    ids=lambda m: type(m).__name__,
)
def test_metric_contract(metric) -> None:
    """Sum-reduced states are what makes merge_state and DDP sync exact."""
    assert metric._reductions and all(fn is dim_zero_sum for fn in metric._reductions.values())
    assert metric.full_state_update is False
    assert metric.is_differentiable is False
