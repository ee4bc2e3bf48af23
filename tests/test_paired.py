"""Paired statistics against textbook and hand-computed cases."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from refusal.errors import DataError
from refusal.stats.paired import (
    N_BOOTSTRAP,
    TAIL_RESAMPLES,
    bootstrap_interval,
    check_same_prompts,
    holm,
    mcnemar_exact,
    paired_mean_difference,
    paired_rate_difference,
    prompts_digest,
    resamples_for,
)


def table(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt outcomes of two runs with the given paired 2x2 table."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return np.array(a), np.array(b)


def test_newcombe_interval_matches_the_textbook_example():
    # Fagerland, Lydersen & Laake (2017), ch. 8: complete response before/after consolidation therapy
    # (Cavo et al. 2012), table [[59, 6], [16, 80]]: Newcombe's square-and-add interval -0.0621 (-0.1186 to -0.0046)
    d = paired_rate_difference(*table(59, 6, 16, 80))
    assert d.estimate == pytest.approx(-10 / 161)
    assert (round(d.lo, 4), round(d.hi, 4)) == (-0.1186, -0.0046)
    assert (d.n, d.a_only, d.b_only) == (161, 6, 16)


def test_newcombe_interval_by_hand_with_uncorrelated_pairs():
    # both=1, a_only=1, b_only=1, neither=1: ad - bc = 0, so phi = 0 and the interval is the plain
    # square-and-add of two Wilson intervals for 2/4 (half-width w each): [-w*sqrt(2), +w*sqrt(2)]
    from refusal.metrics import wilson_interval

    lo, hi = wilson_interval(2, 4, z=1.959963984540054)
    d = paired_rate_difference(*table(1, 1, 1, 1))
    assert d.estimate == 0
    assert d.hi == pytest.approx((hi - 0.5) * math.sqrt(2)) and d.lo == pytest.approx(-(hi - 0.5) * math.sqrt(2))


def test_paired_interval_is_narrower_than_unpaired_when_runs_agree_on_most_prompts():
    d = paired_rate_difference(*table(20, 0, 6, 6))  # 20/32 vs 26/32: every change goes one way
    assert d.hi < 0  # separate Wilson intervals [45-78] and [65-91] overlap; the pairs do not
    same = paired_rate_difference(*table(32, 0, 0, 0))
    assert same.estimate == 0 and same.lo < 0 < same.hi and same.p_value == 1.0  # 32 prompts cannot prove "no change"


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 2**7)  # 0.125
    assert mcnemar_exact(6, 16) == pytest.approx(2 * sum(math.comb(22, k) for k in range(7)) / 2**22)  # 0.0525
    assert mcnemar_exact(6, 16) == pytest.approx(0.0525, abs=5e-5)  # Fagerland et al.: exact McNemar p = 0.052
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert paired_rate_difference(*table(59, 6, 16, 80)).p_value == mcnemar_exact(6, 16)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_paired_mean_difference_collapses_on_a_constant_shift_and_matches_the_normal_interval():
    rng = np.random.default_rng(3)
    a = rng.gamma(2.0, size=50)
    shift = paired_mean_difference(a + 0.3, a)
    assert (shift.estimate, shift.lo, shift.hi) == pytest.approx((0.3, 0.3, 0.3))
    x, y = rng.normal(1.0, 2.0, 2000), rng.normal(0.0, 2.0, 2000)
    d = paired_mean_difference(x, y)
    half = 1.959964 * np.std(x - y, ddof=1) / math.sqrt(2000)
    assert d.estimate == pytest.approx(np.mean(x - y))
    assert d.lo == pytest.approx(d.estimate - half, abs=0.15 * half) and d.hi == pytest.approx(d.estimate + half, abs=0.15 * half)


def test_weighted_mean_difference_is_the_per_token_mean():
    nll_a, nll_b, tokens = np.array([1.0, 4.0, 2.0]), np.array([1.0, 2.0, 2.0]), np.array([1, 3, 2])
    d = paired_mean_difference(nll_a, nll_b, weights=tokens)
    assert d.estimate == pytest.approx((0 + 2 * 3 + 0) / 6)


def test_bootstrap_is_seeded_and_drops_undefined_resamples():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    first = bootstrap_interval(lambda v: v.mean(-1), x)
    assert first == bootstrap_interval(lambda v: v.mean(-1), x) and first[1] <= 1.5 <= first[2]
    est, lo, hi = bootstrap_interval(lambda v: 1 / v.mean(-1), np.array([0.0, 0.0, 1.0]))
    assert est == pytest.approx(3.0) and np.isfinite(lo) and np.isfinite(hi)


def test_a_bonferroni_wide_interval_gets_resamples_enough_that_its_ends_do_not_move_with_the_seed():
    assert resamples_for(0.95) == N_BOOTSTRAP  # the usual 95% interval: unchanged
    wide = 1 - 0.05 / 8  # C3's level with 8 values of k
    assert resamples_for(wide) * (1 - wide) / 2 >= TAIL_RESAMPLES - 1e-6
    x = np.random.default_rng(3).normal(size=300)
    normal_theory = x.mean() - NormalDist().inv_cdf(1 - (1 - wide) / 2) * x.std() / math.sqrt(len(x))
    lows = [bootstrap_interval(lambda v: v.mean(-1), x, confidence=wide, seed=seed)[1] for seed in range(12)]
    assert max(abs(lo - normal_theory) for lo in lows) < 0.008  # 4000 resamples: ends up to 0.011 away


def test_runs_on_different_prompts_are_refused_even_with_the_same_count():
    check_same_prompts(["a", "b"], ["a", "b"])
    check_same_prompts(prompts_digest(["a", "b"]), ["a", "b"])
    with pytest.raises(DataError, match="prompts differ .* paired statistics need the same prompts"):
        check_same_prompts(["a", "b"], ["a", "c"])
    with pytest.raises(DataError, match="prompts differ"):
        check_same_prompts(["a", "b"], ["b", "a"])  # same set, other order: the pairs would be wrong
    with pytest.raises(DataError, match="one value per prompt"):
        paired_rate_difference([True, False], [True])


def test_run_comparisons_refuse_other_completions_and_missing_records(tmp_path):
    from refusal.compare import RunOutcomes, compare

    def outcomes(tokens: int, forced: bool = True) -> RunOutcomes:
        tf = {"nll": np.ones(3), "tokens": np.full(3, tokens), "kl_div": np.zeros(3)} if forced else {}
        return RunOutcomes({"harmful": "same"}, {"harmful": np.array([True, False, True])}, teacher_forced=tf)

    assert compare(outcomes(4), outcomes(4))["harmless/perplexity_ratio_vs_b"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="different harmless completions .* use the same eval.max_new_tokens"):
        compare(outcomes(4), outcomes(6))
    assert "harmless/perplexity_ratio_vs_b" not in compare(outcomes(4), outcomes(4, forced=False))  # refusal only
    with pytest.raises(DataError, match="completions.jsonl not found"):
        RunOutcomes.from_dir(tmp_path)
    with pytest.raises(DataError, match="share no column"):
        compare(outcomes(4), RunOutcomes({"other": "same"}, {"other": np.array([True])}))


def test_perplexity_is_paired_only_on_the_prompts_whose_unsteered_text_both_runs_scored():
    """Two runs whose unsteered completions differ on one prompt (a batch mix in bfloat16 decoded it otherwise): that
    prompt leaves both runs, the rest stay aligned; token counts that differ are refused by the plain pairing."""
    from refusal.compare import on_common_text, teacher_forced_vs

    def run(texts: list[str], nll: list[float], tokens: list[float]) -> dict[str, np.ndarray]:
        return {"baseline_completion": np.array(texts, dtype=object), "nll": np.array(nll), "tokens": np.array(tokens),
                "kl_div": np.zeros(len(texts))}

    a = run(["x", "y", "z"], [2.0, 4.0, 9.0], [2, 4, 3])
    b = run(["x", "y other", "z"], [1.0, 8.0, 3.0], [2, 5, 3])
    with pytest.raises(DataError, match="token counts differ"):
        teacher_forced_vs(a, b, "b")
    a_cut, b_cut, n = on_common_text(a, b)
    assert n == 2 and a_cut["nll"].tolist() == [2.0, 9.0] and b_cut["tokens"].tolist() == [2, 3]
    # mean NLL per token a − b, weighted by tokens: x (2/2 − 1/2) with weight 2, z (9/3 − 3/3) with weight 3
    ratio = teacher_forced_vs(a_cut, b_cut, "b")["harmless/perplexity_ratio_vs_b"]
    assert ratio == pytest.approx(math.exp((2 * 0.5 + 3 * 2.0) / 5))
    untexted = {k: v for k, v in a.items() if k != "baseline_completion"}  # recorded before the text was: all prompts
    assert on_common_text(untexted, b)[2] == 3
    with pytest.raises(DataError, match="token counts differ"):
        teacher_forced_vs(*on_common_text(untexted, b)[:2], "b")
