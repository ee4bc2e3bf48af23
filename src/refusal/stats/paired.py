"""Paired comparisons of two runs on the same prompts: the design every intervention of a sweep shares.

Two runs judged on the same prompts differ only where their verdicts on a prompt differ, so a paired
interval is far narrower than two separate intervals compared side by side. Refusal is binary per
prompt: :func:`paired_rate_difference` gives the difference of rates with Newcombe's score interval for
paired data and :func:`mcnemar_exact` the exact test on the discordant pairs. KL and perplexity are
continuous per prompt: :func:`paired_mean_difference` bootstraps prompts. :func:`holm` adjusts the
p-values of several claims tested together. Every function refuses two runs whose prompts differ
(:func:`check_same_prompts`): a paired statistic of different prompts has no meaning.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from jaxtyping import Bool, Float

from refusal.errors import DataError
from refusal.metrics import wilson_interval

#: Bootstrap resamples and seed: fixed, so a report is reproducible to the digit.
N_BOOTSTRAP, SEED = 4000, 0
#: Resamples beyond each end of a percentile interval, at the least: a wider interval (a Bonferroni-corrected one)
#: gets more resamples, or its ends would move with the seed (at 99.4% and 4000 resamples only 12 lie beyond each).
TAIL_RESAMPLES = 100


def resamples_for(confidence: float, n_boot: int = N_BOOTSTRAP) -> int:
    """``n_boot``, raised so that each tail of a ``confidence`` interval holds ``TAIL_RESAMPLES`` resamples."""
    return max(n_boot, math.ceil(TAIL_RESAMPLES / ((1 - confidence) / 2) - 1e-9))


def prompts_digest(prompts: Sequence[str]) -> str:
    """SHA-256 of the ordered prompt texts: two runs are paired only when their digests match."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:16]


def check_same_prompts(a: str | Sequence[str], b: str | Sequence[str], what: str = "the two runs' prompts") -> None:
    """Raise :class:`DataError` unless ``a`` and ``b`` (prompt lists or their digests) are the same prompts
    in the same order; counts alone are not enough, two samples of 32 prompts are not a pair."""
    da, db = (x if isinstance(x, str) else prompts_digest(x) for x in (a, b))
    if da != db:
        raise DataError(f"{what} differ (digest {da} vs {db}): paired statistics need "
                        "the same prompts in the same order; compare runs made with the same data and test-set settings")


def _pair(a: Sequence, b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or a.shape != b.shape:
        raise DataError(f"paired values need one value per prompt in each run, got shapes {a.shape} and {b.shape}; "
                        "compare runs on the same prompts")
    if len(a) == 0:
        raise DataError("no prompts to compare")
    return a, b


@dataclass(frozen=True)
class PairedDifference:
    """``estimate`` = statistic(a) − statistic(b) with its interval [lo, hi]; for refusal also the discordant
    counts (``a_only``: prompts a refused and b did not) and McNemar's exact two-sided p."""

    estimate: float
    lo: float
    hi: float
    n: int
    a_only: int | None = None
    b_only: int | None = None
    p_value: float | None = None

    def as_points(self, scale: float = 100.0) -> str:
        """``−12.5 [−20.1, −4.9]`` (points of refusal by default)."""
        return f"{scale * self.estimate:+.1f} [{scale * self.lo:+.1f}, {scale * self.hi:+.1f}]"


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def paired_rate_difference(a: Bool[np.ndarray, " n"] | Sequence[bool], b: Bool[np.ndarray, " n"] | Sequence[bool],
                           confidence: float = 0.95) -> PairedDifference:
    """Rate(a) − rate(b) over the same prompts, Newcombe's (1998) hybrid score interval for paired data
    (his method 10), with McNemar's exact p.

    Why this interval: it is built from the two Wilson intervals (the ones the report already prints)
    joined through the pairs' correlation, so it stays inside [−1, 1] and keeps its coverage at the
    rates near 0 and 1 and the n of 32–300 this study has, where the Wald interval collapses; it is
    closed-form (no resampling noise at a rule's boundary) and is the interval Fagerland et al. (2014)
    recommend for paired proportions. The correlation φ has Newcombe's correction (ad − bc shrunk by
    n/2 towards 0 when positive).
    """
    a, b = (x.astype(bool) for x in _pair(a, b))
    n = len(a)
    both, a_only, b_only = int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum())
    neither = n - both - a_only - b_only
    z = _z(confidence)
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    (l1, u1), (l2, u2) = wilson_interval(both + a_only, n, z), wilson_interval(both + b_only, n, z)
    margins = (both + a_only) * (neither + b_only) * (both + b_only) * (neither + a_only)
    cross = both * neither - a_only * b_only
    corrected = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return PairedDifference(d, max(-1.0, lo), min(1.0, hi), n, a_only, b_only, mcnemar_exact(a_only, b_only))


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """McNemar's exact two-sided p: under 'no difference' each discordant prompt goes either way with
    probability 1/2, so p = min(1, 2·P(Binomial(a_only + b_only, 1/2) ≤ min(a_only, b_only)))."""
    if a_only < 0 or b_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {a_only}, {b_only}")
    m = a_only + b_only
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1))
    return min(1.0, 2 * tail / 2**m)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment, in the input order: the i-th smallest p times (m − i), made monotone
    and capped at 1. Controls the family-wise error of several claims tested together, never less
    powerful than Bonferroni."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def bootstrap_interval(statistic: Callable[..., np.ndarray], *columns: Sequence[float], confidence: float = 0.95,
                       n_boot: int = N_BOOTSTRAP, seed: int = SEED) -> tuple[float, float, float]:
    """(estimate, lo, hi): ``statistic`` on the prompts, and its percentile interval over ``n_boot``
    resamples of whole prompts (every column resampled with the same rows, which keeps the pairing); more
    when the interval is wider than 95% (:func:`resamples_for`).

    ``statistic`` takes the columns as ``[resamples, n]`` arrays and returns one value per resample;
    resamples where it is not finite (e.g. a ratio over a zero denominator) are dropped.
    """
    cols = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(cols[0])
    if any(c.shape != (n,) for c in cols) or n == 0:
        raise DataError(f"bootstrap columns need one value per prompt each, got shapes {[c.shape for c in cols]}")
    _z(confidence)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples_for(confidence, n_boot), n))
    with np.errstate(divide="ignore", invalid="ignore"):  # undefined resamples are dropped below
        estimate = float(statistic(*(c[None] for c in cols))[0])
        values = statistic(*(c[idx] for c in cols))
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return estimate, math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return estimate, float(lo), float(hi)


def paired_mean_difference(a: Float[np.ndarray, " n"] | Sequence[float], b: Float[np.ndarray, " n"] | Sequence[float],
                           weights: Float[np.ndarray, " n"] | Sequence[float] | None = None, confidence: float = 0.95,
                           n_boot: int = N_BOOTSTRAP, seed: int = SEED) -> PairedDifference:
    """Mean(a) − mean(b) over the same prompts (weighted means when ``weights`` is given, e.g. tokens per
    prompt for a per-token mean), with a seeded paired bootstrap percentile interval over prompts.

    Why a bootstrap: per-prompt KL and log-perplexity are skewed with heavy right tails (one prompt the
    intervention derails dominates), where a t-interval's symmetry is wrong at n = 32; resampling whole
    prompts keeps each prompt's pair (and its token count) together and assumes no distribution.
    """
    a, b = (x.astype(np.float64) for x in _pair(a, b))
    w = np.ones_like(a) if weights is None else _pair(a, weights)[1].astype(np.float64)

    def diff(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        return ((x - y) * w).sum(-1) / w.sum(-1)

    estimate, lo, hi = bootstrap_interval(diff, a, b, w, confidence=confidence, n_boot=n_boot, seed=seed)
    return PairedDifference(estimate, lo, hi, len(a))
