"""The LightningModule that runs INLP: one training epoch = one INLP iteration.

Keeping a whole INLP run inside one ``Trainer.fit`` pays the Trainer's setup once instead of once
per direction. The (already centred and scaled) activations live on the module and are moved to the
accelerator once at fit start, so no step copies them. At the start
of each epoch the data are projected onto the nullspace of the directions found so far (one
matmul pair on the whole tensor), the linear classifier and its optimiser state are reset, and
the classifier is fitted: full batch with L-BFGS (one ``training_step``, manual optimisation with
a closure), or mini-batch Adam over index batches. At the end of the epoch its weight vector is
orthonormalised against the previous directions and appended, accuracies are logged with
``step = iteration``, and the Trainer is told to stop once held-out accuracy is at chance.

Several devices (DDP): every rank keeps the full data (needed for identical accuracies and
projections), but each computes the loss on its own shard; the loss is scaled so that DDP's
gradient *mean* equals the full-data gradient, and the value handed to L-BFGS is all-reduced so
every rank takes the same line-search decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from refusal.fitting.threads import FIT_THREADS

CLASSIFIERS = ("logistic", "svm")


def orthonormal_append(W: Tensor, w: Tensor, rel_tol: float = 1e-6) -> tuple[Tensor, bool]:
    """Append ``w`` to the orthonormal rows ``W`` by Gram–Schmidt (twice, in float64 on CPU).

    Returns ``(W, False)`` unchanged when ``w`` lies numerically inside their span (or is zero):
    such a classifier found nothing new, and normalising its residue would store pure noise.
    """
    W64 = W.detach().to("cpu", torch.float64)
    v = w.detach().to("cpu", torch.float64).reshape(-1)
    norm = float(v.norm())
    r = v
    for _ in range(2):  # classical GS twice ("twice is enough") keeps rows orthonormal to ~1e-15
        if W64.shape[0]:
            r = r - W64.T @ (W64 @ r)
    r_norm = float(r.norm())
    if not math.isfinite(r_norm) or norm == 0.0 or r_norm <= rel_tol * norm:
        return W, False
    return torch.cat([W64, (r / r_norm)[None]]).to(W.dtype), True


class _IndexBatches:
    """Shuffled index batches for mini-batch mode: ``passes`` epochs over ``n`` rows, this rank's share.

    Every rank draws the same permutation (same seed) and takes its slice of each global batch, so
    all ranks run the same number of steps (DDP needs that) and together cover each batch once.
    Yields ``(local_indices, global_batch_size)``.
    """

    def __init__(self, n: int, batch_size: int, passes: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.passes, self.seed = n, batch_size, passes, seed
        self.rank, self.world = rank, world
        self.epoch = 0  # set by the module before each INLP iteration
        self.global_batch = batch_size * world

    def __len__(self) -> int:
        return self.passes * math.ceil(self.n / self.global_batch)

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for _ in range(self.passes):
            perm = torch.randperm(self.n, generator=gen)
            for chunk in perm.split(self.global_batch):
                yield chunk.tensor_split(self.world)[self.rank], int(chunk.numel())


class INLPModule(LightningModule):
    """Linear classifiers fitted one after another on nullspace-projected activations."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        x_val: Tensor,
        y_val: Tensor,
        *,
        classifier: str = "logistic",
        l2: float = 1e-3,
        threshold: float = 0.5,
        batch_size: int | None = None,
        max_steps: int = 500,
        max_epochs: int = 20,
        lr: float = 0.1,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-10,
        history_size: int = 20,
        seed: int = 0,
        num_threads: int = FIT_THREADS,
        hparams: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        if hparams:
            self.save_hyperparameters(hparams)  # the Trainer logs them to the logger at fit start
        self.classifier = classifier
        self.l2 = float(l2)
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.max_steps, self.max_epochs, self.lr = max_steps, max_epochs, lr
        self.tolerance_grad, self.tolerance_change, self.history_size = tolerance_grad, tolerance_change, history_size
        self.seed = seed
        self.num_threads = num_threads  # CPU threads of the fit: float sums depend on the count
        self._caller_threads: int | None = None
        d = x.shape[1]
        self.linear = nn.Linear(d, 1)
        # Plain attributes, not buffers: moved to the device once in ``on_fit_start``, never
        # checkpointed, and never broadcast by DDP on each forward as buffers would be.
        self.x, self.y = x, y.to(x.dtype)
        self.x_val, self.y_val = x_val, y_val.to(x.dtype)
        self.xp, self.xp_val = x, x_val  # the data projected for the current iteration
        self.W = torch.zeros(0, d, dtype=x.dtype)  # directions so far, on the device
        self.W64 = torch.zeros(0, d, dtype=torch.float64)  # CPU float64 copy for Gram–Schmidt
        self.train_accuracy: list[float] = []
        self.val_accuracy: list[float] = []
        self.degenerate = False  # a classifier's weight fell inside the span of earlier ones
        self._batches: _IndexBatches | None = None

    # -- Lightning plumbing ------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.batch_size is None:
            return torch.optim.LBFGS(
                self.linear.parameters(),
                lr=1.0,
                max_iter=self.max_steps,
                max_eval=2 * self.max_steps,
                tolerance_grad=self.tolerance_grad,
                tolerance_change=self.tolerance_change,
                history_size=self.history_size,
                line_search_fn="strong_wolfe",
            )
        return torch.optim.Adam(self.linear.parameters(), lr=self.lr)

    def train_dataloader(self) -> Any:
        if self.batch_size is None:
            return [0]  # one dummy batch per epoch: the data are already on the module
        self._batches = _IndexBatches(
            self.x.shape[0], self.batch_size, self.max_epochs, self.seed,
            self.trainer.global_rank, self.trainer.world_size,
        )
        return self._batches

    def on_fit_start(self) -> None:
        """Pin the CPU thread count and move the data to the accelerator once (the module is placed by now).

        Pinned here, not only by the caller: Lightning's DDP launchers set each rank's count (to
        ``cpu_count // world_size`` when ``OMP_NUM_THREADS`` is unset), and the loss and gradient sums depend on it.
        """
        self._caller_threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        for name in ("x", "y", "x_val", "y_val", "W"):
            setattr(self, name, getattr(self, name).to(self.device))
        self.xp, self.xp_val = self.x, self.x_val

    def on_fit_end(self) -> None:
        if self._caller_threads is not None:
            torch.set_num_threads(self._caller_threads)
            self._caller_threads = None

    def on_train_epoch_start(self) -> None:
        """Project the data onto the current nullspace and reset the classifier and optimiser."""
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
            if self.W.shape[0]:
                self.xp = self.x - (self.x @ self.W.T) @ self.W
                self.xp_val = self.x_val - (self.x_val @ self.W.T) @ self.W
        self.optimizers().optimizer.state.clear()
        if self._batches is not None:
            self._batches.epoch = self.current_epoch

    # -- the objective -------------------------------------------------------------------------
    def _data_loss_sum(self, x: Tensor, y: Tensor) -> Tensor:
        """Summed classification loss (mean is taken by the caller over the *global* count)."""
        z = self.linear(x).squeeze(-1)
        if self.classifier == "logistic":
            return F.binary_cross_entropy_with_logits(z, y, reduction="sum")
        margin = (2.0 * y - 1.0) * z  # squared hinge, as LinearSVC's default loss
        return torch.clamp(1.0 - margin, min=0.0).square().sum()

    def _penalty(self) -> Tensor:
        return 0.5 * self.l2 * self.linear.weight.square().sum()  # the intercept is not penalised

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        world = self.trainer.world_size
        if self.batch_size is None:
            n = self.xp.shape[0]
            xs = self.xp.tensor_split(world)[self.global_rank]
            ys = self.y.tensor_split(world)[self.global_rank]

            def closure() -> Tensor:
                opt.zero_grad()
                local = self._data_loss_sum(xs, ys) / n
                penalty = self._penalty()
                self.manual_backward(local * world + penalty)
                value = local.detach()
                if world > 1:
                    value = self.trainer.strategy.reduce(value, reduce_op="sum")
                return value + penalty.detach()

            opt.step(closure=closure)
            self._finish_iteration()
            return
        idx, global_count = batch
        # Cosine decay to zero within each iteration: constant-lr Adam keeps jittering around the
        # optimum, and the jitter would end up in the stored direction.
        progress = batch_idx / len(self._batches)
        for group in opt.optimizer.param_groups:
            group["lr"] = self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        loss = self._data_loss_sum(self.xp[idx], self.y[idx]) / global_count * world + self._penalty()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        if batch_idx == len(self._batches) - 1:
            self._finish_iteration()

    # -- end of an INLP iteration ----------------------------------------------------------------
    @torch.no_grad()
    def _accuracy(self, x: Tensor, y: Tensor) -> float:
        pred = (self.linear(x).squeeze(-1) > 0).to(y.dtype)
        return float((pred == y).to(torch.float64).mean())

    @torch.no_grad()
    def _finish_iteration(self) -> None:
        """Score the classifier, keep its direction, log, and stop at chance."""
        iteration = len(self.val_accuracy)
        train_acc = self._accuracy(self.xp, self.y)
        val_acc = self._accuracy(self.xp_val, self.y_val)
        self.train_accuracy.append(train_acc)
        self.val_accuracy.append(val_acc)
        self.W64, added = orthonormal_append(self.W64, self.linear.weight[0])
        if added:
            self.W = self.W64.to(device=self.W.device, dtype=self.W.dtype)
        else:
            self.degenerate = True
        self.log_dict({"train_acc": train_acc, "val_acc": val_acc}, prog_bar=True, logger=False, on_step=True)
        metrics = {
            "inlp/iteration": float(iteration),
            "inlp/train_acc": train_acc,
            "inlp/val_acc": val_acc,
            "inlp/n_directions": float(self.W.shape[0]),
        }
        for logger in self.loggers:
            logger.log_metrics(metrics, step=iteration)
            logger.save()
        if not added or val_acc <= self.threshold:
            self.trainer.should_stop = True
