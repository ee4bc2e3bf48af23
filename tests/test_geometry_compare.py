"""``python -m refusal.geometry``: several interventions on one model, one table, one plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

from refusal.errors import ConfigError
from refusal.geometry.compare import InterventionSpec
from refusal.pipeline import fit, prepare

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
