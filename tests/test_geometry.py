"""Geometry of steered activations on synthetic clusters with a planted refusal direction."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import pytest
import torch

from refusal.geometry import (
    LANDING_THRESHOLDS,
    LandingThresholds,
    fit_probe,
    format_table,
    landing_label,
    landing_stats,
    layer_table,
    plot_landing,
    plot_layer_table,
)
from refusal.geometry.plots import DPI, landing_figsize

D = 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _direction(d: int = D, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g, dtype=torch.float64)
    return r / r.norm()


def _clusters(n: int, r: torch.Tensor, sep: float = 2.0, noise: float = 0.5, seed: int = 0):
    """Harmful around +sep*r, harmless around -sep*r (refusal direction points to harmful)."""
    g = torch.Generator().manual_seed(seed)
    harmful = sep * r + noise * torch.randn(n, r.numel(), generator=g, dtype=torch.float64)
    harmless = -sep * r + noise * torch.randn(n, r.numel(), generator=g, dtype=torch.float64)
    return harmful, harmless


@pytest.fixture(scope="module")
def setup():
    r = _direction()
    harmful, harmless = _clusters(200, r, seed=0)
    # The probe is fit on held-out unsteered activations, never on the points it scores.
    ph, pl = _clusters(200, r, seed=1)
    probe = fit_probe(torch.cat([ph, pl]), torch.cat([torch.ones(200), torch.zeros(200)]))
    mu = (harmful.mean(0) + harmless.mean(0)) / 2
    return r, harmful, harmless, probe, mu


def test_probe_separates_held_out(setup):
    r, harmful, harmless, probe, _ = setup
    y = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))])
    assert probe.accuracy(torch.cat([harmful, harmless]), y) > 0.98
    p = probe.predict_harmful_proba(harmful)
    assert p.shape == (len(harmful),) and float(p.mean()) > 0.9


def test_nullspace_projection_lands_between(setup):
    r, harmful, harmless, probe, mu = setup
    projected = harmful - ((harmful - mu) @ r)[:, None] * r
    s = landing_stats(harmful, harmless, projected, probe)
    assert s["axis_coordinate"] == pytest.approx(0.5, abs=0.05)
    assert s["label"] == "between"
    assert s["axis_coordinate_std"] < 0.05
    assert s["dist_to_harmful"] == pytest.approx(s["dist_to_harmless"], rel=0.1)


def test_mirror_lands_opposite(setup):
    r, harmful, harmless, probe, mu = setup
    mirrored = harmful - 2 * ((harmful - mu) @ r)[:, None] * r
    s = landing_stats(harmful, harmless, mirrored, probe)
    assert s["axis_coordinate"] == pytest.approx(1.0, abs=0.05)
    assert s["probe_p_harmful"] < 0.5
    assert s["label"] == "opposite"
    # the probe's mean over prompts with its bootstrap interval: covers the mean and, by the normal
    # approximation (mean ± 1.96 sd/sqrt(n)), has about its width
    p = probe.predict_harmful_proba(mirrored).numpy()
    lo, hi = s["probe_p_harmful_ci95"]
    assert lo <= s["probe_p_harmful"] <= hi and s["probe_p_harmful"] == pytest.approx(p.mean())
    assert hi - lo == pytest.approx(2 * 1.96 * p.std(ddof=1) / len(p) ** 0.5, rel=0.25)
    assert s["label_ci"] == "opposite"  # the whole probe interval lies below 0.5
    assert s["dist_to_harmless"] < s["dist_to_harmful"]


def test_identity_stays_and_distances_normalised(setup):
    r, harmful, harmless, probe, _ = setup
    s = landing_stats(harmful, harmless, harmful, probe)
    assert s["axis_coordinate"] == pytest.approx(0.0, abs=1e-9)
    assert s["label"] == "stays"
    assert s["dist_to_harmful"] < s["dist_to_harmless"]
    assert s["probe_p_harmful"] > 0.9
    # Normalised by the centroid distance (~4): within-cluster spread 0.5*sqrt(32) ~ 2.83 -> ~0.7.
    gap = float((harmful.mean(0) - harmless.mean(0)).norm())
    expected = float((harmful - harmful.mean(0)).norm(dim=1).mean()) / gap
    assert s["dist_to_harmful"] == pytest.approx(expected, rel=1e-9)
    # Scale invariance: the numbers describe geometry, not activation norms.
    s10 = landing_stats(10 * harmful, 10 * harmless, 10 * harmful)
    assert s10["dist_to_harmful"] == pytest.approx(s["dist_to_harmful"], rel=1e-9)
    assert math.isnan(s10["probe_p_harmful"])


def test_opposite_needs_probe_agreement(setup):
    _, harmful, harmless, _, _ = setup
    assert landing_label(0.9) == "opposite"
    assert landing_label(0.9, p_harmful=0.8) == "between"
    assert landing_label(-0.3) == "stays"
    strict = LandingThresholds(stays_below=0.1, opposite_above=0.95)
    assert landing_label(0.2, thresholds=strict) == "between"
    assert LANDING_THRESHOLDS.stays_below == 0.25 and LANDING_THRESHOLDS.opposite_above == 0.75
    with pytest.raises(ValueError):
        LandingThresholds(stays_below=0.8, opposite_above=0.2)


def test_input_validation(setup):
    _, harmful, harmless, _, _ = setup
    with pytest.raises(ValueError, match="hidden size"):
        landing_stats(harmful, harmless, harmful[:, :8])
    with pytest.raises(ValueError, match="coincide"):
        landing_stats(harmful, harmful, harmful)
    with pytest.raises(ValueError, match="both classes"):
        fit_probe(harmful, torch.ones(len(harmful)))


def _stacked(r: torch.Tensor, seps=(0.25, 0.5, 1.0, 2.0), n: int = 300):
    layers = [_clusters(n, r, sep=s, seed=10 + i) for i, s in enumerate(seps)]
    return torch.stack([h for h, _ in layers]), torch.stack([s for _, s in layers])


def test_layer_table_tracks_separation():
    r = _direction()
    H, L = _stacked(r)
    rows = layer_table(H.float(), L.float(), direction=r.float())
    assert [row["layer"] for row in rows] == [0, 1, 2, 3]
    sil = [row["silhouette"] for row in rows]
    assert all(b > a for a, b in zip(sil, sil[1:], strict=False)), sil
    assert rows[-1]["cos_diff_dir"] == pytest.approx(1.0, abs=0.01)
    assert all(row["cos_diff_dir"] > 0.9 for row in rows[1:])
    assert rows[-1]["cos_harmful_dir"] > 0.9 and rows[-1]["cos_harmless_dir"] < -0.9
    assert rows[-1]["cos_means"] < -0.9  # means at +-2r point in opposite directions
    assert rows[-1]["norm_harmful_mean"] == pytest.approx(2.0, rel=0.05)


def test_layer_table_options_and_subsample():
    r = _direction()
    H, L = _stacked(r, seps=(0.5, 2.0), n=400)  # 800 points > 512: silhouette subsamples
    rows = layer_table(H, L, layers=[6, 12])
    assert [row["layer"] for row in rows] == [6, 12]
    assert "cos_diff_dir" not in rows[0]
    assert layer_table(H, L, layers=[6, 12]) == rows  # seeded subsample: reproducible
    per_layer = torch.stack([r, -r])
    rows_pl = layer_table(H, L, direction=per_layer)
    assert rows_pl[0]["cos_diff_dir"] > 0.9 and rows_pl[1]["cos_diff_dir"] < -0.9
    with pytest.raises(ValueError):
        layer_table(H, L, layers=[1, 2, 3])
    with pytest.raises(ValueError):
        layer_table(H, L, direction=torch.ones(D + 1))


def test_format_table():
    r = _direction()
    H, L = _stacked(r)
    rows = layer_table(H, L, direction=r)
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| layer") and "silhouette" in lines[0]
    assert set(lines[1].replace("|", "").replace(" ", "")) <= {"-", ":"}
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    mixed = format_table(
        [{"name": "a|b", "x": 1.23456, "n": 3}, {"name": "c", "x": float("nan"), "n": 4}], ".2f"
    )
    assert "1.23" in mixed and "nan" in mixed and "a\\|b" in mixed
    assert format_table([]) == ""


def _check_png(path, expected_hw=None):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    if expected_hw is not None:
        assert img.shape[:2] == expected_hw
    return img


def test_plots_written(setup, tmp_path):
    r, harmful, harmless, probe, mu = setup
    transformed = {
        "identity": harmful,
        "INLP nullspace": harmful - ((harmful - mu) @ r)[:, None] * r,
        "counterfactual flip": harmful - 2 * ((harmful - mu) @ r)[:, None] * r,
    }
    out = plot_landing(
        harmful, harmless, transformed, tmp_path / "sub" / "landing.png", title="synthetic", probe=probe
    )
    assert out == tmp_path / "sub" / "landing.png"
    w, h = landing_figsize(3)
    _check_png(out, (round(h * DPI), round(w * DPI)))
    assert [p.name for p in out.parent.iterdir()] == ["landing.png"]  # no temp file left behind

    H, L = _stacked(r)
    out2 = plot_layer_table(layer_table(H, L, direction=r), tmp_path / "layers.png")
    _check_png(out2)
    out3 = plot_layer_table(layer_table(H, L), tmp_path / "layers_nodir.png")
    _check_png(out3)
    with pytest.raises(ValueError):
        plot_landing(harmful, harmless, {}, tmp_path / "empty.png")
