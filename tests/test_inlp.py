"""INLP fitted by a Lightning Trainer: geometry, planted-concept recovery, sklearn parity, artifacts, logging."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference.inlp_reference import (
    fit_inlp_reference,
    get_projection_to_intersection_of_nullspaces,
    get_rowspace_projection,
    make_planted_concept,
)

from refusal.errors import ArtifactError, ConfigError, DataError
from refusal.fitting.inlp import INLPConfig, INLPResult, fit_inlp, orthonormal_append
from refusal.fitting.threads import fixed_threads

K = 3  # planted concept dimension


@pytest.fixture(scope="module")
def planted():
    return make_planted_concept(4000, 64, K, spread=2.0, seed=0)


@pytest.fixture(scope="module")
def fitted(planted) -> INLPResult:
    X, y, X_val, y_val, _ = planted
    return fit_inlp(X, y, X_val, y_val, INLPConfig(n_iterations=8, accelerator="cpu"), enable_progress_bar=False)


@pytest.fixture(scope="module")
def reference(planted) -> INLPResult:
    X, y, X_val, y_val, _ = planted
    return fit_inlp_reference(X, y, X_val, y_val, n_iterations=8)


@pytest.fixture(scope="module")
def small():
    return make_planted_concept(600, 32, 2, seed=1)


def test_directions_orthonormal(fitted):
    W = fitted.directions.double()
    assert W.shape[1] == 64 and W.shape[0] >= K
    assert torch.allclose(W @ W.T, torch.eye(W.shape[0], dtype=W.dtype), atol=1e-5)


def dense_projector(W: torch.Tensor) -> torch.Tensor:
    """I − WᵀW in float64: the d×d matrix INLP artifacts used to store, the oracle for ``project``."""
    W = W.to(torch.float64)
    return torch.eye(W.shape[1], dtype=torch.float64) - W.T @ W


@pytest.mark.parametrize("k", [None, 0, 1, K])
def test_project_equals_the_dense_projector_on_random_data(fitted, k):
    W = fitted.directions[: (fitted.rank if k is None else k)]
    x = torch.randn(200, fitted.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5 + 3
    torch.testing.assert_close(fitted.project(x, k), x @ dense_projector(W), rtol=0, atol=1e-6)
    x32 = x.float()  # in x's dtype: float32 rounding only, a few eps of |x|
    torch.testing.assert_close(fitted.project(x32, k).double(), x @ dense_projector(W), rtol=0, atol=1e-4)
    assert fitted.project(x32, k).dtype == torch.float32


@pytest.mark.parametrize("k", [-1, K + 99, 1.0, True])
def test_project_rejects_a_k_outside_the_rank(fitted, k):
    with pytest.raises(ConfigError, match=r"must be an int in 0\.\."):
        fitted.project(torch.zeros(fitted.d_model), k)


@pytest.mark.parametrize("k", [None, 1, K])
def test_projection_is_orthogonal_projector_onto_nullspace(fitted, k):
    P = fitted.project(torch.eye(fitted.d_model, dtype=torch.float64), k)  # rows of I: the matrix itself
    W = fitted.directions[: (fitted.rank if k is None else k)].double()
    assert torch.allclose(P @ P, P, atol=1e-5)
    assert torch.allclose(P, P.T, atol=1e-6)
    assert (P @ W.T).abs().max() < 1e-5
    assert torch.linalg.matrix_rank(P, atol=1e-4).item() == 64 - W.shape[0]


def test_planted_concept_recovered(planted, fitted):
    *_, U = planted
    acc = fitted.val_accuracy
    assert acc[0] > 0.9  # the concept is there
    assert K <= fitted.n_useful <= K + 1
    assert acc[K] <= fitted.chance + 0.05  # once the planted subspace is gone, so is the signal
    assert acc[-1] <= fitted.chance + 0.02 and fitted.config["stop_reason"] == "chance"  # stopped by the rule
    # the leading directions span (nearly) the planted subspace: cosines of the principal angles
    # (the last planted axis is the weakest, so its direction also picks up some sampling noise)
    cosines = torch.linalg.svdvals(fitted.directions[:K].double() @ U.double())
    assert cosines[: K - 1].min() > 0.95 and cosines.min() > 0.8, cosines
    assert torch.linalg.svdvals(fitted.directions[: K + 1].double() @ U.double()).min() > 0.9


def test_accuracy_falls_towards_chance(fitted):
    acc = fitted.val_accuracy
    assert all(later <= earlier + 0.02 for earlier, later in zip(acc, acc[1:], strict=False)), acc
    assert acc[-1] < acc[0]
    assert len(fitted.train_accuracy) == len(acc) == fitted.rank


def test_directions_point_to_harmful(planted, fitted):
    X, y, *_ = planted
    gap = (X[y == 1].mean(0) - X[y == 0].mean(0)) @ fitted.directions[0]
    assert gap > 0
    assert torch.allclose(fitted.center, (fitted.mean_harmful + fitted.mean_harmless) / 2, atol=1e-5)


def test_parity_with_sklearn_reference(fitted, reference):
    assert fitted.n_useful == reference.n_useful
    assert fitted.chance == reference.chance
    n = min(len(fitted.val_accuracy), len(reference.val_accuracy))
    assert n >= fitted.n_useful + 1 or fitted.rank == 8
    np.testing.assert_allclose(fitted.val_accuracy[:n], reference.val_accuracy[:n], atol=0.02)
    np.testing.assert_allclose(fitted.train_accuracy[:n], reference.train_accuracy[:n], atol=0.02)
    # L-BFGS reaches sklearn's optimum: the useful directions coincide
    cos = (fitted.directions[: fitted.n_useful] * reference.directions[: fitted.n_useful]).sum(1)
    assert cos.min() > 0.99, cos


def test_parity_svm(small):
    X, y, X_val, y_val, _ = small
    ours = fit_inlp(X, y, X_val, y_val, INLPConfig(n_iterations=4, classifier="svm"), enable_progress_bar=False)
    ref = fit_inlp_reference(X, y, X_val, y_val, n_iterations=4, classifier="svm")
    assert ours.n_useful == ref.n_useful
    n = min(len(ours.val_accuracy), len(ref.val_accuracy))
    np.testing.assert_allclose(ours.val_accuracy[:n], ref.val_accuracy[:n], atol=0.02)


def test_reference_projection_matches_ours(reference):
    d = reference.d_model
    W = reference.directions.double().numpy()
    P_ref = get_projection_to_intersection_of_nullspaces([get_rowspace_projection(w[None]) for w in W], d)
    np.testing.assert_allclose(P_ref, reference.project(torch.eye(d, dtype=torch.float64)).numpy(), atol=1e-5)


def test_invariant_to_activation_scale(small):
    """Residual streams have large norms and offsets: internal scaling makes that irrelevant."""
    X, y, X_val, y_val, _ = small
    cfg = INLPConfig(n_iterations=3)
    base = fit_inlp(X, y, X_val, y_val, cfg, enable_progress_bar=False)
    big = fit_inlp(X * 300 + 40, y, X_val * 300 + 40, y_val, cfg, enable_progress_bar=False)
    assert big.val_accuracy == pytest.approx(base.val_accuracy, abs=2e-3)
    k = min(base.n_useful, big.n_useful)
    assert (base.directions[:k] * big.directions[:k]).sum(1).min() > 0.999


def test_same_seed_is_bit_identical(small):
    X, y, X_val, y_val, _ = small
    for cfg in (INLPConfig(n_iterations=3, seed=7), INLPConfig(n_iterations=2, seed=7, batch_size=128, max_epochs=2)):
        a = fit_inlp(X, y, X_val, y_val, cfg, enable_progress_bar=False)
        b = fit_inlp(X, y, X_val, y_val, cfg, enable_progress_bar=False)
        assert torch.equal(a.directions, b.directions)
        assert a.val_accuracy == b.val_accuracy and a.train_accuracy == b.train_accuracy


def test_minibatch_adam_close_to_full_batch(small):
    X, y, X_val, y_val, _ = small
    full = fit_inlp(X, y, X_val, y_val, INLPConfig(n_iterations=2), enable_progress_bar=False)
    mini = fit_inlp(X, y, X_val, y_val, INLPConfig(n_iterations=2, batch_size=300, max_epochs=30, lr=0.3),
                    enable_progress_bar=False)
    W = mini.directions.double()
    assert torch.allclose(W @ W.T, torch.eye(W.shape[0], dtype=W.dtype), atol=1e-5)
    assert abs(mini.val_accuracy[0] - full.val_accuracy[0]) < 0.03
    assert float(mini.directions[0] @ full.directions[0]) > 0.95


def test_save_load_roundtrip(tmp_path, fitted):
    stem = tmp_path / "inlp_L3"
    fitted.save(stem, {"model": "tiny", "layer": 3})
    loaded = INLPResult.load(stem, expect={"model": "tiny", "layer": 3, "d_model": 64})
    assert torch.equal(loaded.directions, fitted.directions)
    for name in ("mean_harmful", "mean_harmless", "center"):
        assert torch.equal(getattr(loaded, name), getattr(fitted, name))
    assert loaded.train_accuracy == fitted.train_accuracy and loaded.val_accuracy == fitted.val_accuracy
    assert (loaded.n_useful, loaded.chance, loaded.config) == (fitted.n_useful, fitted.chance, fitted.config)
    x = torch.randn(5, 64)
    assert torch.equal(loaded.project(x), fitted.project(x))


def test_artifact_stores_the_rows_not_the_dense_projector(tmp_path, fitted):
    from safetensors import safe_open
    stem = tmp_path / "inlp"
    fitted.save(stem)
    with safe_open(str(stem) + ".safetensors", framework="pt") as fh:
        shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    d, k = fitted.d_model, fitted.rank
    assert shapes == {"directions": (k, d), "mean_harmful": (d,), "mean_harmless": (d,), "center": (d,)}
    size = (tmp_path / "inlp.safetensors").stat().st_size
    assert (k + 3) * d * 4 <= size < (k + 3) * d * 4 + 1024  # float32 payload plus the safetensors header


def test_artifact_in_the_old_format_with_the_dense_projector_still_loads(tmp_path, fitted):
    """Artifacts written before the rows-only format also hold ``projection`` [d, d]: read, checksum and all."""
    from refusal.artifacts import load_artifact, save_artifact
    from refusal.fitting.inlp import TENSOR_KEYS
    stem = tmp_path / "old"
    old = {**fitted.to_tensors(), "projection": dense_projector(fitted.directions).float()}
    save_artifact(stem, old, {**fitted.meta(), "model": "tiny"})
    loaded = INLPResult.load(stem, expect={"model": "tiny"})
    assert torch.equal(loaded.directions, fitted.directions) and torch.equal(loaded.center, fitted.center)
    assert set(load_artifact(stem, keys=TENSOR_KEYS)[0]) == set(TENSOR_KEYS)  # the d×d tensor is not read
    x = torch.randn(7, fitted.d_model, dtype=torch.float64)
    torch.testing.assert_close(loaded.project(x), x @ old["projection"].double(), rtol=0, atol=1e-6)
    # the checksum still covers the old file: a flipped byte in it is refused, not silently used
    path = tmp_path / "old.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="checksum"):
        INLPResult.load(stem)


def test_load_with_mismatched_expect_raises(tmp_path, fitted):
    stem = tmp_path / "inlp"
    fitted.save(stem, {"model": "tiny"})
    with pytest.raises(ArtifactError, match="d_model"):
        INLPResult.load(stem, expect={"d_model": 128})
    with pytest.raises(ArtifactError, match="model"):
        INLPResult.load(stem, expect={"model": "other"})


def test_extra_meta_cannot_override_core_keys(tmp_path, fitted):
    with pytest.raises(ConfigError):
        fitted.save(tmp_path / "x", {"d_model": 1})


def test_logger_receives_per_iteration_metrics(tmp_path, small):
    from lightning.pytorch.loggers import CSVLogger

    X, y, X_val, y_val, _ = small
    logger = CSVLogger(tmp_path, name="inlp", version=0)
    result = fit_inlp(X, y, X_val, y_val, INLPConfig(n_iterations=4), logger=logger, enable_progress_bar=False)
    with open(tmp_path / "inlp" / "version_0" / "metrics.csv", newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("inlp/val_acc")]
    assert [int(row["step"]) for row in rows] == list(range(len(result.val_accuracy)))
    assert [float(row["inlp/val_acc"]) for row in rows] == pytest.approx(result.val_accuracy)
    assert [float(row["inlp/train_acc"]) for row in rows] == pytest.approx(result.train_accuracy)
    assert (tmp_path / "inlp" / "version_0" / "hparams.yaml").read_text().count("inlp/") > 5


def test_orthonormal_append_skips_vectors_in_span():
    W, added = orthonormal_append(torch.zeros(0, 4), torch.tensor([3.0, 0, 0, 0]))
    assert added and torch.equal(W, torch.tensor([[1.0, 0, 0, 0]]))
    W2, added = orthonormal_append(W, torch.tensor([2.0, 0, 0, 0]))
    assert not added and W2 is W
    W3, added = orthonormal_append(W, torch.tensor([1.0, 1.0, 0, 0]))
    assert added and torch.allclose(W3[1], torch.tensor([0.0, 1.0, 0, 0]))


@pytest.mark.parametrize(
    "bad",
    [{"classifier": "tree"}, {"l2": 0.0}, {"n_iterations": 0}, {"batch_size": 0}, {"center": "median"},
     {"lr": float("inf")}, {"epsilon": float("nan")}, {"l2": float("inf")}],
)
def test_bad_config_raises(small, bad):
    X, y, X_val, y_val, _ = small
    with pytest.raises(ConfigError):
        fit_inlp(X, y, X_val, y_val, INLPConfig(**bad), enable_progress_bar=False)


def test_bad_data_raises(small):
    X, y, X_val, y_val, _ = small
    with pytest.raises(DataError, match="one class"):
        fit_inlp(X, torch.ones_like(y), X_val, y_val, INLPConfig(n_iterations=1), enable_progress_bar=False)
    with pytest.raises(DataError):
        fit_inlp(X, y, X_val[:, :5], y_val, INLPConfig(n_iterations=1), enable_progress_bar=False)


def test_pipeline_fits_to_convergence_by_default_and_keys_artifacts_by_settings(compose, caplog):
    """Default INLP stops at chance, not at a cap; a fit with other settings is another artifact, not a clash."""
    from refusal.context import prepare
    from refusal.fits import fit, inlp_record

    small = ["data.n_train=16", "data.n_val=8", "data.n_test=8", "fit.dim.n_prompts=4", "layer=fixed", "layer.index=1"]
    default = fit(prepare(compose(*small)))
    assert default.inlp.stop_reason == "chance" and default.inlp.rank < 300
    record = inlp_record(default)
    assert len(record["val_accuracy"]) == len(record["capture"]) == len(record["cos_with_dim"]) == default.inlp.rank
    with caplog.at_level("WARNING", logger="refusal.fitting.inlp"):
        capped = fit(prepare(compose(*small, "fit.inlp.n_iterations=1")))
    assert capped.inlp.stop_reason == "cap" and capped.inlp.rank == 1
    assert "stopped at its cap of 1 iterations" in caplog.text
    ctx = prepare(compose(*small))
    assert len(list(ctx.artifact_dir.glob("inlp_*.safetensors"))) == 2  # both fits kept
    again = fit(ctx)  # reuses the first: same directions, no refusal
    torch.testing.assert_close(again.inlp.directions, default.inlp.directions, rtol=0, atol=0)
    # where it ran is part of the key: on a CPU machine accelerator=auto and cpu are the same fit, recorded as such;
    # beside a GPU, auto ran there and the CPU fit is a third artifact
    on_gpu = torch.cuda.is_available()
    explicit = prepare(compose(*small, "fit.inlp.accelerator=cpu"))
    fit(explicit)
    assert len(list(explicit.artifact_dir.glob("inlp_*.safetensors"))) == (3 if on_gpu else 2)
    metas = [json.loads(p.read_text())["meta"]["fit_settings"] for p in explicit.artifact_dir.glob("inlp_*.json")]
    assert {m["runs_on"] for m in metas} == ({"gpu", "cpu"} if on_gpu else {"cpu"})
    assert all(m["fit_threads"] == 1 for m in metas if m["runs_on"] == "cpu")


# Fits one saved problem under a thread count, as a joblib worker (1) or a serial run (2) would.
THREADED_FIT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from refusal.fitting.inlp import INLPConfig, fit_inlp
X, y, X_val, y_val = torch.load(sys.argv[2])
r = fit_inlp(X, y, X_val, y_val, INLPConfig(n_iterations=3, accelerator="cpu"), enable_progress_bar=False)
torch.save({"directions": r.directions, "rank": r.rank, "train": r.train_accuracy, "val": r.val_accuracy,
            "threads_after": torch.get_num_threads()}, sys.argv[3])
"""


def fit_under_threads(script: str, data, threads: int, tmp_path) -> dict:
    """Run ``script`` on ``data`` in a fresh process limited to ``threads`` CPU threads; its saved result."""
    torch.save(data, tmp_path / "data.pt")
    out = tmp_path / f"threads{threads}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", script, str(threads), str(tmp_path / "data.pt"), str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def test_fit_is_bit_identical_under_one_and_two_threads(tmp_path):
    """Artifacts are shared by key, so the thread count must not change them. Over 32768 rows ATen
    splits the loss and intercept-gradient sums into one partial sum per thread; the fit pins it."""
    X, y, X_val, y_val, _ = make_planted_concept(40_000, 16, 2, n_val=2_000, seed=0)
    one, two = (fit_under_threads(THREADED_FIT, (X, y, X_val, y_val), t, tmp_path) for t in (1, 2))
    assert one["rank"] == two["rank"] >= 2
    assert torch.equal(one["directions"], two["directions"])
    assert one["train"] == two["train"] and one["val"] == two["val"]
    assert (one["threads_after"], two["threads_after"]) == (1, 2)  # the caller's count is given back


def test_fixed_threads_gives_the_callers_count_back_even_on_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"), fixed_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
