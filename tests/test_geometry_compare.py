"""``python -m refusal.geometry``: several interventions on one model, one table, one plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from refusal.context import prepare
from refusal.errors import ConfigError
from refusal.fits import fit
from refusal.geometry.compare import InterventionSpec

SMALL = ["data.n_train=16", "data.n_val=8", "data.n_test=8", "fit.dim.n_prompts=4", "progress=false", "logger=none"]


def test_cli_table_and_actadd_shift_is_exact(tmp_path, compose):
    places = [f"cache_dir={tmp_path / 'cache'}", f"artifacts_dir={tmp_path / 'artifacts'}"]
    out = tmp_path / "geo"
    proc = subprocess.run(
        [sys.executable, "-m", "refusal.geometry", "--interventions",
         "none,actadd:coeff=1.0,actadd:coeff=-1.0,inlp_nullspace,inlp_flip:alpha=1.0", "--out", str(out),
         "model=tiny", *places, *SMALL],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "geometry.json").read_text())
    rows = {r["intervention"]: r for r in result["rows"]}
    assert list(rows) == ["none", "actadd (coeff=1.0)", "actadd (coeff=-1.0)", "inlp_nullspace", "inlp_flip (alpha=1.0)"]
    assert all(r["label"] in ("stays", "between", "opposite") for r in rows.values())
    # Unsteered harmful activations average to the harmful centroid: t = 0 by definition.
    assert rows["none"]["t"] == pytest.approx(0.0, abs=1e-5) and rows["none"]["label"] == "stays"
    assert rows["none"]["harmless_t"] == pytest.approx(0.0, abs=1e-5)
    # actadd adds c·r at the measured site, so t moves by exactly c·r·(μ_harmless − μ_harmful)/gap².
    ctx = prepare(compose("model=tiny", *places, *SMALL))
    fitted = fit(ctx, {"dim"})
    assert (result["layer"], result["position"]) == (fitted.dim.layer, fitted.dim.position)
    site = lambda split: ctx.activations(split)[:, fitted.dim.layer, fitted.dim.position].double()  # noqa: E731
    gap = site("harmless_test").mean(0) - site("harmful_test").mean(0)
    expected = float(fitted.dim.direction.double() @ gap / (gap @ gap))
    assert rows["actadd (coeff=1.0)"]["t"] == pytest.approx(expected, abs=1e-4)
    assert rows["actadd (coeff=-1.0)"]["t"] == pytest.approx(-expected, abs=1e-4)
    assert any(k.startswith("t@L") for k in rows["none"])
    md = (out / "geometry.md").read_text()
    assert "inlp_flip (alpha=1.0)" in md and "geometry_landing.png" in md
    assert (out / "geometry_landing.png").stat().st_size > 20_000


def test_spec_parsing_and_errors():
    spec = InterventionSpec.parse("inlp_flip:k=2:alpha=0.5")
    assert spec.overrides() == ["intervention=inlp_flip", "intervention.k=2", "intervention.alpha=0.5"]
    assert spec.label == "inlp_flip (k=2, alpha=0.5)"
    with pytest.raises(ConfigError, match="name:key=value"):
        InterventionSpec.parse("actadd:coeff")


def test_unknown_intervention_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "refusal.geometry", "--interventions", "none,nope", "--out", str(tmp_path),
         "model=tiny", f"cache_dir={tmp_path}", f"artifacts_dir={tmp_path}", *SMALL],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def _configs(tmp_path, *specs: str):
    from refusal.geometry.compare import compose_configs

    places = [f"cache_dir={tmp_path / 'cache'}", f"artifacts_dir={tmp_path / 'artifacts'}"]
    return compose_configs([InterventionSpec.parse(s) for s in specs], ["model=tiny", *places, *SMALL])


def test_every_spec_is_checked_before_any_forward_pass(tmp_path, monkeypatch):
    """k beyond the fitted rank fails right after fitting, before the first intervention's passes."""
    from refusal.geometry import compare as cmp

    def no_forward(*args, **kwargs):
        raise AssertionError("a forward pass ran before every spec was checked")

    monkeypatch.setattr(cmp, "landing_at", no_forward)
    with pytest.raises(ConfigError, match=r"inlp_flip \(k=64\): intervention.k=64 must be in 1\.\.\d+ \(the fitted INLP rank\)"):
        cmp.compare(_configs(tmp_path, "none", "inlp_flip:k=64"), tmp_path / "geo")
    with pytest.raises(ConfigError, match="intervention.layers='most' must be one of"):  # config-only: before the model loads
        cmp.compare(_configs(tmp_path, "none", "actadd:layers=most"), tmp_path / "geo")
    assert not (tmp_path / "geo" / "geometry.json").exists()


def test_rows_are_written_as_they_finish(tmp_path, monkeypatch):
    from refusal.geometry import compare as cmp

    real, calls = cmp.landing_at, []

    def second_one_dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-run")
        return real(*args, **kwargs)

    monkeypatch.setattr(cmp, "landing_at", second_one_dies)
    with pytest.raises(RuntimeError, match="killed"):
        cmp.compare(_configs(tmp_path, "inlp_nullspace", "inlp_flip", "none"), tmp_path / "geo")
    saved = json.loads((tmp_path / "geo" / "geometry.json").read_text())
    assert [r["intervention"] for r in saved["rows"]] == ["inlp_nullspace"]
    row = saved["rows"][0]
    assert row["t_lo"] <= row["t"] <= row["t_hi"] and 0 <= row["capture"] <= 1 and row["t_pred"] == pytest.approx(row["capture"] / 2)
    assert saved["inlp"]["stop_reason"] in ("chance", "degenerate") and (tmp_path / "geo" / "capture.png").exists()
