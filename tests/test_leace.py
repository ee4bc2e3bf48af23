"""LEACE on the tiny model: erasure makes the class means coincide, the flip is a reflection."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from refusal.context import prepare
from refusal.errors import ConfigError
from refusal.fits import _inlp_data, fit
from refusal.interventions import get_intervention

SMALL = ["data.n_train=16", "data.n_val=8", "data.n_test=8", "layer=fixed", "layer.index=2"]


@pytest.fixture
def leace_run(compose):
    ctx = prepare(compose(*SMALL))
    fitted = fit(ctx, {"leace"})
    X, y = _inlp_data(ctx, "train", fitted.dim.layer, fitted.dim.position, "all")
    return ctx, fitted, X, y


def make(name, fitted, **cfg):
    return get_intervention(name)({"name": name, **cfg}, fitted)


def test_erasure_makes_the_class_means_coincide_and_a_refitted_probe_is_at_chance(leace_run):
    _, fitted, X, y = leace_run
    erased = make("leace_erase", fitted).transform(X).double()
    gap_before = (X[y == 1].double().mean(0) - X[y == 0].double().mean(0)).norm()
    gap_after = (erased[y == 1].mean(0) - erased[y == 0].mean(0)).norm()
    assert gap_after < 1e-4 * gap_before
    probe = LogisticRegression(max_iter=5000).fit(erased.numpy(), y.numpy())
    assert probe.score(erased.numpy(), y.numpy()) <= 0.5 + 0.05
    assert LogisticRegression(max_iter=5000).fit(X.numpy(), y.numpy()).score(X.numpy(), y.numpy()) > 0.9  # it was decodable


def test_flip_is_a_reflection_twice_the_identity_and_maps_harmful_mean_to_harmless(leace_run):
    _, fitted, X, y = leace_run
    flip = make("leace_flip", fitted)
    torch.testing.assert_close(flip.transform(flip.transform(X)), X, rtol=0, atol=1e-3 * float(X.abs().max()))
    leace = fitted.leace
    torch.testing.assert_close(flip.transform(leace.mean_harmful[None])[0], leace.mean_harmless, rtol=0, atol=1e-3)
    assert float(leace.proj_right @ leace.proj_left) == pytest.approx(1.0, abs=1e-4)  # an (oblique) projection
    assert make("leace_flip", fitted, alpha=3.0).expected_landing(fitted.dim.direction)["t_pred"] == 2.0


def test_erase_hooks_take_every_scope_and_the_artifact_is_reused(leace_run, tiny_bundle):
    ctx, fitted, _, _ = leace_run
    assert len(make("leace_erase", fitted, layers="all").hook_specs(ctx.bundle)) == 3 * ctx.bundle.n_layers
    assert len(make("leace_flip", fitted, layers="all").hook_specs(ctx.bundle)) == ctx.bundle.n_layers
    again = fit(ctx, {"leace"}).leace
    assert torch.equal(again.proj_left, fitted.leace.proj_left) and torch.equal(again.bias, fitted.leace.bias)


@pytest.mark.parametrize("bad", [{"alpha": float("nan")}, {"alpha": "x"}, {"target": "neutral"}])
def test_bad_flip_parameters(leace_run, bad):
    with pytest.raises(ConfigError, match="|".join(bad)):
        make("leace_flip", leace_run[1], **bad)


def test_missing_package_names_the_extra_before_the_model_loads(compose, monkeypatch):
    from refusal.config import check_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "concept_erasure" else real(name, *a))
    with pytest.raises(ConfigError, match=r"concept-erasure package: pip install -e '\.\[leace\]'"):
        check_config(compose("intervention=leace_erase"))


# Fits one saved problem under a thread count, as a joblib worker (1) or a serial run (2) would.
THREADED_FIT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from refusal.fitting.leace import fit_leace
X, y = torch.load(sys.argv[2])
tensors = fit_leace(X, y).to_tensors()
torch.save({**tensors, "threads_after": torch.get_num_threads()}, sys.argv[3])
"""


def test_fit_is_bit_identical_under_one_and_two_threads(tmp_path):
    """Artifacts are shared by key, so the caller's thread count must not change them (MKL's product and
    eigh are reproducible only for a fixed count; the fit pins it) and must be given back afterwards."""
    from reference.inlp_reference import make_planted_concept

    X, y, *_ = make_planted_concept(40_000, 32, 2, n_val=1, seed=0)
    torch.save((X, y), tmp_path / "data.pt")
    results = []
    for threads in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        out = tmp_path / f"threads{threads}.pt"
        done = subprocess.run([sys.executable, "-c", THREADED_FIT, str(threads), str(tmp_path / "data.pt"), str(out)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(torch.load(out))
    one, two = results
    assert (one.pop("threads_after"), two.pop("threads_after")) == (1, 2)
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)
