"""Reference INLP with scikit-learn, written as in the original repository, to check ``fit_inlp``.

The helpers ``get_rowspace_projection``, ``get_projection_to_intersection_of_nullspaces`` and the
loop of ``get_debiasing_projection`` follow shauli-ravfogel/nullspace_projection (Ravfogel et al.
2020, ``src/debias.py``): fit a classifier on the projected data, add the projection onto its
rowspace, rebuild the projection onto the intersection of all nullspaces, reproject the data from
the original. Two changes make it comparable with :func:`refusal.fitting.inlp.fit_inlp`:

* the stopping rule: stop as soon as held-out accuracy is ≤ chance + ``epsilon`` (chance = the
  majority-class rate of the held-out labels); that last classifier's direction is kept, as in
  ``fit_inlp``, and ``n_useful`` counts the directions above the threshold;
* directions: the weight vectors are orthonormalised in order (Gram–Schmidt), giving the same
  ``[k, d]`` rows ``fit_inlp`` returns (the original only keeps the projection matrices).

Regularisation. scikit-learn minimises ``C·Σᵢ loss_i + ½‖w‖²`` on the data it is given, here
the raw activations. ``fit_inlp`` minimises ``mean_i loss_i + (l2/2)‖w'‖²`` on activations that
were centred and divided by a scalar ``s`` (the RMS of the centred training entries), where
``w' = s·w``. Both have the same minimiser exactly when ``C = 1 / (l2 · n · s²)``:
:func:`sklearn_C` computes that. For LinearSVC the same mapping holds for the squared hinge, up
to liblinear also penalising the intercept (``fit_inlp`` does not).

Also here: :func:`make_planted_concept`, synthetic activations whose label is linearly decodable
only through a known k-dimensional subspace, which tests and the benchmark use.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from refusal.errors import ConfigError
from refusal.fitting.inlp import (
    INLPResult,
    chance_rate,
    class_means,
    input_scale,
    n_useful_of,
    orthonormal_append,
)


# -- the original repository's helpers (numpy) ---------------------------------------------------
def get_rowspace_projection(W: np.ndarray) -> np.ndarray:
    """Projection matrix onto the rowspace of ``W`` ([k, d] -> [d, d])."""
    if np.allclose(W, 0):
        w_basis = np.zeros_like(W.T)
    else:
        w_basis = scipy.linalg.orth(W.T)  # orthonormal basis of the rowspace
    return w_basis.dot(w_basis.T)


def get_projection_to_intersection_of_nullspaces(rowspace_projection_matrices: list[np.ndarray], input_dim: int) -> np.ndarray:
    """P = I − P_R(Σᵢ P_Rᵢ): projection onto the intersection of the classifiers' nullspaces."""
    identity = np.eye(input_dim)
    Q = np.sum(rowspace_projection_matrices, axis=0)
    return identity - get_rowspace_projection(Q)


def sklearn_C(l2: float, n: int, scale: float = 1.0) -> float:
    """scikit-learn's C equivalent to ``fit_inlp``'s ``l2`` on ``n`` rows whose input scale is ``scale``."""
    if l2 <= 0:
        raise ConfigError(f"l2={l2!r} must be > 0 to map to a finite C")
    return 1.0 / (l2 * n * scale**2)


def _classifier(kind: str, C: float, seed: int, max_iter: int, tol: float, intercept_scaling: float):
    if kind == "logistic":
        return LogisticRegression(C=C, tol=tol, max_iter=max_iter, random_state=seed)
    if kind == "svm":
        # liblinear penalises the intercept as a weight on a constant feature of value
        # intercept_scaling; a large value makes that penalty negligible, as in fit_inlp.
        return LinearSVC(C=C, loss="squared_hinge", dual=False, tol=tol, max_iter=max_iter,
                         intercept_scaling=intercept_scaling, random_state=seed)
    raise ConfigError(f"classifier={kind!r} must be 'logistic' or 'svm'")


def fit_inlp_reference(
    X: torch.Tensor,
    y: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
    n_iterations: int = 16,
    classifier: str = "logistic",
    C: float | None = None,
    epsilon: float = 0.02,
    seed: int = 0,
    *,
    l2: float = 1e-3,
    max_iter: int = 2000,
    tol: float = 1e-6,
    intercept_scaling: float = 100.0,
) -> INLPResult:
    """INLP with scikit-learn classifiers in float64; ``C=None`` derives C from ``l2`` like ``fit_inlp``.

    ``intercept_scaling`` only affects ``classifier="svm"`` (LinearSVC, see ``_classifier``).
    """
    Xn = X.detach().to("cpu", torch.float64).numpy()
    Xv = X_val.detach().to("cpu", torch.float64).numpy()
    yn = y.detach().cpu().numpy().astype(np.int64)
    yv = y_val.detach().cpu().numpy().astype(np.int64)
    n, d = Xn.shape
    mean_harmful, mean_harmless, center = class_means(X, y)
    if C is None:
        C = sklearn_C(l2, n, input_scale(X, center))
    chance = chance_rate(y_val)
    threshold = chance + epsilon

    rowspace_projections: list[np.ndarray] = []
    directions = torch.zeros(0, d, dtype=torch.float64)
    train_acc: list[float] = []
    val_acc: list[float] = []
    X_cp, Xv_cp = Xn.copy(), Xv.copy()
    for _ in range(n_iterations):
        clf = _classifier(classifier, C, seed, max_iter, tol, intercept_scaling)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X_cp, yn)
        train_acc.append(float(clf.score(X_cp, yn)))
        val_acc.append(float(clf.score(Xv_cp, yv)))
        W = clf.coef_  # [1, d]
        directions, added = orthonormal_append(directions, torch.from_numpy(W[0].copy()))
        if not added or val_acc[-1] <= threshold:
            break
        rowspace_projections.append(get_rowspace_projection(W))
        P = get_projection_to_intersection_of_nullspaces(rowspace_projections, d)
        X_cp = (P.dot(Xn.T)).T
        Xv_cp = (P.dot(Xv.T)).T

    return INLPResult(
        directions=directions.to(torch.float32),
        train_accuracy=train_acc,
        val_accuracy=val_acc,
        mean_harmful=mean_harmful,
        mean_harmless=mean_harmless,
        center=center,
        n_useful=n_useful_of(val_acc, threshold, directions.shape[0]),
        chance=chance,
        config={"implementation": "sklearn-reference", "classifier": classifier, "C": C, "epsilon": epsilon,
                "n_iterations": n_iterations, "seed": seed},
    )


# -- synthetic data ------------------------------------------------------------------------------
def make_planted_concept(
    n: int,
    d: int,
    k: int = 3,
    *,
    n_val: int | None = None,
    separation: float = 2.0,
    spread: float = 4.0,
    offset: float = 10.0,
    noise: float = 1.0,
    p_harmful: float = 0.5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations whose label is linearly decodable only inside a planted k-dim subspace U.

    Inside U the two classes are Gaussians with a shared diagonal covariance whose standard
    deviations σⱼ spread geometrically over ``[1/√spread, √spread]·noise``, and means ±μ with
    ``μⱼ = separation·σⱼ/2``: every planted axis alone separates the classes equally well. The
    best linear classifier (∝ μⱼ/σⱼ²) is then *not* parallel to μ, so removing it leaves part of
    the mean difference for the next one: INLP needs about k directions, all inside U. Outside
    U: isotropic noise plus a large common offset (like a residual stream's mean).
    Returns ``X, y, X_val, y_val, U`` with ``U`` of shape [d, k] (orthonormal columns).
    """
    if not 1 <= k <= d:
        raise ConfigError(f"k={k} must be in 1..d={d}")
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    base = offset * torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    stds = noise * torch.logspace(-0.5, 0.5, k, base=spread, dtype=torch.float64) if k > 1 else torch.tensor([noise], dtype=torch.float64)
    mu = separation / 2 * stds / noise

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.rand(m, generator=gen, dtype=torch.float64) < p_harmful).long()
        sign = (2 * labels - 1).to(torch.float64)[:, None]
        z = sign * mu + torch.randn(m, k, generator=gen, dtype=torch.float64) * stds
        out = noise * torch.randn(m, d, generator=gen, dtype=torch.float64)
        out = out - (out @ U) @ U.T
        return (base + out + z @ U.T).to(torch.float32), labels

    X, y = draw(n)
    X_val, y_val = draw(n if n_val is None else n_val)
    return X, y, X_val, y_val, U.to(torch.float32)
