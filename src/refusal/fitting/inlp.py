"""INLP (Iterative Nullspace Projection, Ravfogel et al. 2020) on refusal activations.

Iteration i fits a linear classifier (harmful = 1 vs harmless = 0) on the activations projected
onto the nullspace of the directions found so far, orthonormalises its weight vector against
them and keeps it. The run stops after ``n_iterations`` or as soon as held-out accuracy is at
chance (≤ majority-class rate + ``epsilon``): the rows of ``INLPResult.directions`` are then an
ordered orthonormal basis of the linearly decodable "harmfulness" subspace, the leading rows the
most informative. Row i is oriented towards "harmful" (its classifier's positive side), and
``val_accuracy[i]`` is the held-out accuracy of the classifier it came from; the last row of a run
that stopped early is the one whose classifier was already at chance, so ``n_useful`` counts the
rows above the threshold and ``project(x, result.n_useful)`` removes only those. A weight vector
numerically inside the span of the earlier rows is not stored and ends the run
(``config["stop_reason"] == "degenerate"``): the next classifier would see the same data.

Fitting runs in a ``lightning.Trainer`` (see :mod:`refusal.fitting.inlp_module`), on a fixed CPU thread
count (:mod:`refusal.fitting.threads`): float sums depend on it, and artifacts are shared by key.
Activations are not standardised per feature (directions must live in activation space), but they are centred and
divided by one scalar ``s`` internally — the RMS of the centred entries, mean row norm / √d — so
that features are O(1) whatever the model's residual scale. A scalar leaves every direction
unchanged and keeps L-BFGS well conditioned. ``l2`` is the L2 coefficient on that normalised
problem, ``mean loss + (l2/2)·‖w'‖²`` with ``w' = s·w``, so it means the same for every model
and width (normalising by the row norm instead would make the penalty grow with d);
scikit-learn's equivalent is ``C = 1 / (l2 · n · s²)`` on the raw activations
(``sklearn_C`` in the test oracle ``tests/reference/inlp_reference.py``).

The artifact stores the k×d rows, never the d×d projector I − WᵀW (256 MiB a layer at d = 8192):
every consumer applies it as x − (x Wᵀ) W (:func:`project_out_subspace`), k·d work per vector
instead of d². Artifacts written before this also hold a ``projection`` tensor; the checksum still
covers it, but it is never read (the rows it was computed from are in the same file).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from refusal.artifacts import load_artifact, save_artifact
from refusal.errors import ConfigError, CorruptArtifactError, DataError
from refusal.fitting.inlp_module import CLASSIFIERS, INLPModule, orthonormal_append
from refusal.fitting.threads import FIT_THREADS, fixed_threads

__all__ = [
    "INLPConfig",
    "INLPResult",
    "fit_inlp",
    "chance_rate",
    "class_means",
    "input_scale",
    "n_useful_of",
    "orthonormal_append",
    "project_out_subspace",
]

CENTERS = ("midpoint", "mean", "zero")
#: The artifact's tensors; an older artifact's ``projection`` (the d×d I − WᵀW) is not read.
TENSOR_KEYS = ("directions", "mean_harmful", "mean_harmless", "center")
log = logging.getLogger(__name__)


@dataclass
class INLPConfig:
    """How to fit INLP. Defaults: full-batch L-BFGS logistic regression until held-out accuracy is at chance."""

    n_iterations: int = 300  # a safety cap: INLP stops at chance; hitting the cap is reported (stop_reason "cap")
    classifier: str = "logistic"  # "logistic" (L2 logistic regression) or "svm" (linear SVM, squared hinge)
    l2: float = 1e-3  # L2 coefficient on the normalised problem; sklearn C = 1/(l2·n·s²), see module doc
    epsilon: float = 0.02  # stop once val accuracy <= chance + epsilon
    batch_size: int | None = None  # None: full batch, L-BFGS; int: mini-batch Adam
    max_steps: int = 500  # L-BFGS iterations per classifier (full batch)
    max_epochs: int = 20  # passes over the data per classifier (mini-batch)
    lr: float = 0.1  # Adam peak learning rate (mini-batch; cosine-decayed to 0 within each iteration)
    tolerance_grad: float = 1e-7  # L-BFGS stops when max |grad| falls below this
    tolerance_change: float = 1e-10  # ... or when loss / step changes fall below this
    center: str = "midpoint"  # stored centre: midpoint of the class means, overall mean, or zero
    seed: int = 0
    accelerator: str = "auto"
    devices: int | str | list[int] = 1

    def validate(self) -> INLPConfig:
        """Raise :class:`ConfigError` naming the field to fix; returns self."""
        if isinstance(self.n_iterations, bool) or not isinstance(self.n_iterations, int) or self.n_iterations < 1:
            raise ConfigError(f"inlp.n_iterations={self.n_iterations!r} must be an int >= 1")
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(f"inlp.classifier={self.classifier!r} must be one of {CLASSIFIERS}")
        if not (isinstance(self.l2, int | float) and self.l2 > 0 and math.isfinite(self.l2)):
            raise ConfigError(f"inlp.l2={self.l2!r} must be a finite number > 0 (separable data have no optimum without it)")
        if not (isinstance(self.epsilon, int | float) and math.isfinite(self.epsilon)):
            raise ConfigError(f"inlp.epsilon={self.epsilon!r} must be a finite number")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ConfigError(f"inlp.batch_size={self.batch_size!r} must be null (full batch) or an int >= 1")
        for name in ("max_steps", "max_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"inlp.{name}={value!r} must be an int >= 1")
        for name in ("lr", "tolerance_grad", "tolerance_change"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"inlp.{name}={value!r} must be a finite number > 0")
        if self.center not in CENTERS:
            raise ConfigError(f"inlp.center={self.center!r} must be one of {CENTERS}")
        return self


@dataclass
class INLPResult:
    """Ordered orthonormal INLP directions plus what steering needs (class means, centre)."""

    directions: Tensor  # [k, d], orthonormal rows, leading = most informative, oriented to "harmful"
    train_accuracy: list[float]  # per iteration, on the projected training data
    val_accuracy: list[float]  # per iteration, on the projected held-out data
    mean_harmful: Tensor  # [d]
    mean_harmless: Tensor  # [d]
    center: Tensor  # [d]
    n_useful: int  # leading directions whose val accuracy was above chance + epsilon
    chance: float  # majority-class rate of the held-out labels
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(self.directions.shape[1])

    @property
    def rank(self) -> int:
        return int(self.directions.shape[0])

    @property
    def stop_reason(self) -> str:
        """chance (converged), cap (fit.inlp.n_iterations reached first) or degenerate."""
        return str(self.config.get("stop_reason", "unknown"))

    def project(self, x: Float[Tensor, "*batch d_model"], k: int | None = None) -> Float[Tensor, "*batch d_model"]:
        """x (I − W_kᵀW_k): x projected onto the nullspace of the first k directions (all if None),
        in x's dtype, without forming the d×d matrix."""
        k = self.rank if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.rank:
            raise ConfigError(f"k={k!r} must be an int in 0..{self.rank}")
        return project_out_subspace(x, self.directions[:k].to(device=x.device, dtype=x.dtype))

    def to_tensors(self) -> dict[str, Tensor]:
        """The k×d rows and three d-vectors: everything the interventions need (flip signs come from the means)."""
        return {
            "directions": self.directions.contiguous(),
            "mean_harmful": self.mean_harmful.contiguous(),
            "mean_harmless": self.mean_harmless.contiguous(),
            "center": self.center.contiguous(),
        }

    def meta(self) -> dict[str, Any]:
        return {
            "method": "inlp",
            "d_model": self.d_model,
            "k": self.rank,
            "n_useful": int(self.n_useful),
            "chance": float(self.chance),
            "train_accuracy": [float(a) for a in self.train_accuracy],
            "val_accuracy": [float(a) for a in self.val_accuracy],
            "inlp_config": dict(self.config),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> INLPResult:
        """Rebuild from :meth:`to_tensors` / :meth:`meta`; :class:`ArtifactError` if inconsistent."""
        missing = [key for key in TENSOR_KEYS if key not in tensors]
        if missing or meta.get("method") != "inlp":
            raise CorruptArtifactError(f"not an INLP artifact (method={meta.get('method')!r}, missing tensors {missing})", "refit it")
        directions = tensors["directions"]
        d = int(meta.get("d_model", -1))
        shapes_ok = directions.ndim == 2 and directions.shape[1] == d and all(
            tensors[key].shape == (d,) for key in ("mean_harmful", "mean_harmless", "center")
        )
        if not shapes_ok or directions.shape[0] != meta.get("k"):
            raise CorruptArtifactError(f"INLP artifact tensors do not match its metadata (d_model={d}, k={meta.get('k')})", "refit it")
        return cls(
            directions=directions,
            train_accuracy=list(meta["train_accuracy"]),
            val_accuracy=list(meta["val_accuracy"]),
            mean_harmful=tensors["mean_harmful"],
            mean_harmless=tensors["mean_harmless"],
            center=tensors["center"],
            n_useful=int(meta["n_useful"]),
            chance=float(meta["chance"]),
            config=dict(meta.get("inlp_config", {})),
        )

    def save(self, stem: str | Path, extra_meta: Mapping[str, Any] | None = None) -> None:
        """Save as an artifact; ``extra_meta`` (model, layer, data hash...) is what ``load`` can check."""
        meta = self.meta()
        clash = sorted(set(meta) & set(extra_meta or {}))
        if clash:
            raise ConfigError(f"extra_meta keys {clash} are reserved by the INLP artifact; rename them")
        save_artifact(stem, self.to_tensors(), {**meta, **(extra_meta or {})})

    @classmethod
    def load(cls, stem: str | Path, expect: Mapping[str, Any] | None = None) -> INLPResult:
        """Load and verify; :class:`ArtifactError` if corrupt or made for something else than ``expect``."""
        tensors, meta = load_artifact(stem, expect, keys=TENSOR_KEYS)
        return cls.from_tensors(tensors, meta)


def project_out_subspace(
    x: Float[Tensor, "*batch d_model"], W: Float[Tensor, "k d_model"], mu: Float[Tensor, " d_model"] | None = None
) -> Float[Tensor, "*batch d_model"]:
    """x − Wᵀ W (x − μ) for orthonormal rows W: the span of W set to μ's coordinates (0 without μ).

    Two k×d products per vector, never the d×d projector (see the module doc)."""
    return x - ((x if mu is None else x - mu) @ W.T) @ W


# -- small helpers shared with the reference ---------------------------------------------------
def chance_rate(y: Tensor) -> float:
    """Majority-class rate: the accuracy of always answering the commoner class."""
    p = float(y.to(torch.float64).mean())
    return max(p, 1.0 - p)


def class_means(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Harmful mean, harmless mean and their midpoint (float64 sums, returned in X's dtype)."""
    X64, mask = X.detach().to(torch.float64), y.bool()
    harmful, harmless = X64[mask].mean(0), X64[~mask].mean(0)
    return harmful.to(X.dtype), harmless.to(X.dtype), ((harmful + harmless) / 2).to(X.dtype)


def input_scale(X: Tensor, center: Tensor) -> float:
    """The scalar activations are divided by internally: RMS of the centred entries (mean row norm / √d)."""
    centred = X.detach().to(torch.float64) - center.to(torch.float64)
    scale = float(centred.norm(dim=1).mean()) / math.sqrt(X.shape[1])
    return scale if scale > 0 else 1.0


def n_useful_of(val_accuracy: list[float], threshold: float, k: int) -> int:
    """Number of leading iterations whose val accuracy was above ``threshold`` (at most k)."""
    count = 0
    for acc in val_accuracy:
        if acc <= threshold:
            break
        count += 1
    return min(count, k)


def _check_data(X: Tensor, y: Tensor, X_val: Tensor, y_val: Tensor) -> None:
    for name, t in (("X", X), ("X_val", X_val)):
        if t.ndim != 2 or not t.is_floating_point():
            raise DataError(f"{name} must be a float tensor [n, d], got {tuple(t.shape)} {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{name} has non-finite values; check the activation extraction")
    if X.shape[1] != X_val.shape[1]:
        raise DataError(f"X has d={X.shape[1]} but X_val has d={X_val.shape[1]}")
    for name, labels, data in (("y", y, X), ("y_val", y_val, X_val)):
        if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
            raise DataError(f"{name} must be a vector of {data.shape[0]} labels, got {tuple(labels.shape)}")
        if labels.numel() == 0 or not bool(((labels == 0) | (labels == 1)).all()):
            raise DataError(f"{name} must be non-empty with labels in {{0 = harmless, 1 = harmful}}")
    if int(y.sum()) in (0, y.numel()):
        raise DataError("training labels hold one class only; INLP needs harmful and harmless examples")


def fit_inlp(
    X: Tensor,
    y: Tensor,
    X_val: Tensor,
    y_val: Tensor,
    cfg: INLPConfig | None = None,
    logger: Any = None,
    enable_progress_bar: bool = True,
    callbacks: list[Any] | None = None,
) -> INLPResult:
    """Fit INLP directions with a Lightning Trainer; same inputs + seed give identical directions on CPU.

    The numerics run on :data:`~refusal.fitting.threads.FIT_THREADS` CPU threads whatever the
    caller's count (restored afterwards), so a joblib worker and a serial run write the same artifact.
    ``logger``: any Lightning logger (or list); it gets ``inlp/train_acc``, ``inlp/val_acc`` and
    ``inlp/n_directions`` with ``step = iteration``, plus the config as hyperparameters.
    """
    cfg = (cfg or INLPConfig()).validate()
    _check_data(X, y, X_val, y_val)
    with fixed_threads(FIT_THREADS):
        return _fit(X, y, X_val, y_val, cfg, logger, enable_progress_bar, callbacks)


def _fit(X: Tensor, y: Tensor, X_val: Tensor, y_val: Tensor, cfg: INLPConfig, logger: Any,
         enable_progress_bar: bool, callbacks: list[Any] | None) -> INLPResult:
    """:func:`fit_inlp` proper, on validated inputs and the pinned thread count."""
    import lightning as L  # deferred: importing lightning costs about a second

    L.seed_everything(cfg.seed, workers=False, verbose=False)

    mean_harmful, mean_harmless, midpoint = class_means(X, y)
    center = {
        "midpoint": midpoint,
        "mean": X.detach().to(torch.float64).mean(0).to(X.dtype),
        "zero": torch.zeros_like(midpoint),
    }[cfg.center]
    # Centre on the midpoint and divide by one scalar: directions are unchanged, conditioning improves.
    scale = input_scale(X, midpoint)
    mid64 = midpoint.to(torch.float64)
    x = ((X.detach().to(torch.float64) - mid64) / scale).to(torch.float32)
    x_val = ((X_val.detach().to(torch.float64) - mid64) / scale).to(torch.float32)
    chance = chance_rate(y_val)
    threshold = chance + cfg.epsilon

    hparams = {f"inlp/{key}": value for key, value in asdict(cfg).items()}
    module = INLPModule(
        x, y.detach().cpu(), x_val, y_val.detach().cpu(),
        classifier=cfg.classifier, l2=cfg.l2, threshold=threshold, batch_size=cfg.batch_size,
        max_steps=cfg.max_steps, max_epochs=cfg.max_epochs, lr=cfg.lr,
        tolerance_grad=cfg.tolerance_grad, tolerance_change=cfg.tolerance_change,
        seed=cfg.seed, num_threads=FIT_THREADS, hparams=hparams if logger else None,
    )
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        max_epochs=cfg.n_iterations,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=enable_progress_bar,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        precision="32-true",
    )
    trainer.fit(module)

    directions = module.W64.to(torch.float32)
    if module.degenerate:
        stop_reason = "degenerate"  # a classifier's weight fell inside the span of the earlier ones
    elif module.val_accuracy and module.val_accuracy[-1] <= threshold:
        stop_reason = "chance"
    else:
        stop_reason = "cap"
        log.warning("INLP stopped at its cap of %d iterations with val accuracy %.3f (chance %.3f + epsilon %.3f): "
                    "the subspace is truncated; raise fit.inlp.n_iterations to converge", cfg.n_iterations,
                    module.val_accuracy[-1] if module.val_accuracy else float("nan"), chance, cfg.epsilon)
    return INLPResult(
        directions=directions,
        train_accuracy=list(module.train_accuracy),
        val_accuracy=list(module.val_accuracy),
        mean_harmful=mean_harmful.detach().cpu().to(torch.float32),
        mean_harmless=mean_harmless.detach().cpu().to(torch.float32),
        center=center.detach().cpu().to(torch.float32),
        n_useful=n_useful_of(module.val_accuracy, threshold, directions.shape[0]),
        chance=chance,
        config={**asdict(cfg), "input_scale": scale, "stop_reason": stop_reason, "implementation": "lightning",
                "fit_threads": FIT_THREADS},
    )
