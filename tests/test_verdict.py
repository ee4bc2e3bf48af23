"""The claims' rules, capture of the DiM difference, and the landing interval."""

from __future__ import annotations

import pytest
import torch

from refusal.fitting.capture import capture_curve, direction_cosines
from refusal.geometry.stats import bootstrap_axis_interval, interval_label, landing_stats
from refusal.metrics import wilson_interval
from refusal.verdict import FAILS, HOLDS, UNSURE, ClaimInputs, c1, c2, c3, c4, claims_table, decide


def row(refused: int, n: int = 32, ppl: float = 2.0, **extra) -> dict:
    return {"harmful/refusal_rate": refused / n, "harmful/refusal_rate_ci95": list(wilson_interval(refused, n)),
            "n_harmful": n, "harmless/perplexity": ppl, **extra}


def geo(t: float, lo: float, hi: float, label: str) -> dict:
    return {"t": t, "t_lo": lo, "t_hi": hi, "label_ci": label}


def inputs(base=16, abl=1, flip=2, null=15, rank=40, flip_by_k=None, null_by_k=None, geometry=None) -> ClaimInputs:
    return ClaimInputs(row(base, ppl=1.8), row(abl), row(flip), row(null), rank,
                       flip_by_k or {}, null_by_k or {}, geometry or {})


@pytest.mark.parametrize(("flip", "verdict"), [(1, HOLDS), (4, HOLDS), (8, UNSURE), (17, FAILS)])
def test_c1_flip_against_ablations_interval_plus_margin(flip, verdict):
    # ablation 1/32 = 3.1% [0.6–15.7]: the line is 15.7%; 8/32 = 25% has its lower bound below the line
    assert c1(inputs(abl=1, flip=flip)).verdict == verdict


def test_c2_needs_nullspace_above_both_intervals_and_at_every_k():
    assert c2(inputs(abl=1, flip=2, null=20)).verdict == HOLDS
    assert c2(inputs(abl=1, flip=10, null=12)).verdict == UNSURE  # inside flip's interval
    assert c2(inputs(abl=10, flip=10, null=1)).verdict == FAILS  # suppresses more than both
    weaker_at_k = inputs(abl=1, flip=2, null=20, flip_by_k={4: row(20)}, null_by_k={4: row(10)})
    assert c2(weaker_at_k).verdict == UNSURE and "below flip at k=[4]" in c2(weaker_at_k).evidence


def test_c3_looks_for_a_small_k_that_keeps_most_of_the_suppression_cheaply():
    # baseline 16/32; full rank 4/32 suppresses 12 points (37.5%)
    cheap = {2: row(12, ppl=1.85), 8: row(6, ppl=1.88), 40: row(4)}
    assert c3(inputs(flip=4, flip_by_k=cheap)).verdict == HOLDS and "k=8" in c3(inputs(flip=4, flip_by_k=cheap)).evidence
    costly = {8: row(6, ppl=2.5), 40: row(4)}
    assert c3(inputs(flip=4, flip_by_k=costly)).verdict == FAILS
    no_suppression = c3(inputs(flip=15, flip_by_k={8: row(15)}))
    assert no_suppression.verdict == FAILS and "no suppression to keep" in no_suppression.evidence


def test_c4_labels_must_hold_over_the_whole_interval():
    assert c4(inputs(geometry={"nullspace": geo(0.4, 0.3, 0.5, "between"), "flip": geo(0.9, 0.8, 1.0, "opposite")})).verdict == HOLDS
    assert c4(inputs(geometry={"nullspace": geo(0.4, 0.3, 0.5, "between"), "flip": geo(0.75, 0.6, 0.9, "inconclusive")})).verdict == UNSURE
    assert c4(inputs(geometry={"nullspace": geo(0.1, 0.0, 0.2, "stays"), "flip": geo(0.9, 0.8, 1.0, "opposite")})).verdict == FAILS
    assert c4(inputs()).verdict == UNSURE


def test_claims_table_has_a_row_per_claim_and_a_column_per_model():
    table = claims_table({"m1": decide(inputs()), "m2": decide(inputs(flip=20))})
    lines = table.splitlines()
    assert lines[0] == "| claim | m1 | m2 |" and len(lines) == 6
    assert "**does not hold**" in lines[2] and "**holds**" in lines[2]  # C1: m1 holds, m2 does not


def test_capture_is_one_inside_the_span_and_zero_orthogonal_to_it():
    q, _ = torch.linalg.qr(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))
    W = q.T  # 4 orthonormal rows
    inside = 2.0 * W[0] - 0.5 * W[2]
    curve = capture_curve(W, inside)
    assert float(curve[-1]) == pytest.approx(1.0, abs=1e-6)
    assert float(curve[1]) == pytest.approx(4.0 / 4.25, abs=1e-6)  # only W[0]'s share by k=2
    orthogonal = torch.randn(16, dtype=torch.float64)
    orthogonal -= W.double().T @ (W.double() @ orthogonal)
    assert float(capture_curve(W, orthogonal).abs().max()) < 1e-12
    assert torch.all(capture_curve(W, torch.randn(16)).diff() >= 0)
    assert float(direction_cosines(W, W[1])[1]) == pytest.approx(1.0, abs=1e-6)


def test_nullspace_and_flip_land_where_capture_predicts_on_symmetric_clusters():
    """For clusters symmetric about the midpoint, nullspace lands at capture/2 and flip at capture."""
    from refusal.fitting.inlp import INLPResult
    from refusal.interventions.base import DiMDirection, Fitted
    from refusal.interventions.builtin import INLPFlip, INLPNullspace

    g = torch.Generator().manual_seed(1)
    d, n = 12, 4000
    delta = torch.zeros(d)
    delta[:3] = torch.tensor([2.0, 1.0, 0.5])
    noise = torch.randn(n, d, generator=g) * 0.1
    harmful, harmless = delta / 2 + noise, -delta / 2 - noise  # exact mirror images about 0
    W = torch.eye(d)[:1]  # captures 4/5.25 of Δ
    inlp = INLPResult(W, [1.0], [1.0], harmful.mean(0), harmless.mean(0), torch.zeros(d), 1, 0.5)
    fitted = Fitted(dim=DiMDirection(delta, 0, -1), inlp=inlp, inlp_layer=0)
    capture = float(capture_curve(W, delta)[-1])
    for cls, factor in ((INLPNullspace, 0.5), (INLPFlip, 1.0)):
        intervention = cls({"name": cls.name}, fitted)
        t = landing_stats(harmful, harmless, intervention.transform(harmful))["axis_coordinate"]
        assert t == pytest.approx(factor * capture, abs=0.01)
        assert intervention.expected_landing(delta)["t_pred"] == pytest.approx(factor * capture)


def test_landing_interval_covers_the_estimate_and_narrows_with_more_prompts():
    g = torch.Generator().manual_seed(2)

    def clusters(n):
        harmful = torch.randn(n, 8, generator=g) + 2
        harmless = torch.randn(n, 8, generator=g) - 2
        return harmful, harmless, harmful - 0.5 * (harmful.mean(0) - harmless.mean(0))  # moved half-way

    small, large = clusters(16), clusters(400)
    lo_s, hi_s = bootstrap_axis_interval(*small)
    lo_l, hi_l = bootstrap_axis_interval(*large)
    assert lo_s <= 0.5 <= hi_s and lo_l <= 0.5 <= hi_l
    assert hi_l - lo_l < hi_s - lo_s


def test_interval_label_is_inconclusive_across_a_threshold():
    assert interval_label(0.5, (0.4, 0.6)) == "between"
    assert interval_label(0.85, (0.7, 0.95), p_harmful=0.2) == "inconclusive"
    assert interval_label(0.9, (0.8, 1.0), p_harmful=0.2) == "opposite"


def test_a_run_that_breaks_the_model_cannot_decide_c1_or_c2():
    broken_flip = inputs(flip=0)
    broken_flip.flip = row(0, ppl=1.8 * 10)  # 0% refusal, but perplexity 10x the baseline's
    verdict = c1(broken_flip)
    assert verdict.verdict == UNSURE and "model broken (ppl 18" in verdict.evidence
    fluent = inputs(flip=0)
    assert c1(fluent).verdict == HOLDS and c2(inputs(null=20)).verdict == HOLDS
    broken_null = inputs(null=20)
    broken_null.nullspace = row(20, ppl=100.0)
    assert c2(broken_null).verdict == UNSURE
