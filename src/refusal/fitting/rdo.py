"""Refusal direction optimisation (RDO) and refusal cones (Wollschläger et al. 2025, "The Geometry of
Refusal in Large Language Models", arXiv 2502.17420; their ``rdo.py``).

A direction r (or a cone: k orthonormal basis rows) is trained by gradient descent so that
- *ablation loss*: ablating r̂ on harmful prompts makes the model produce the compliant target;
- *addition loss*: adding α·r̂ (α = |r_DiM|) at the DiM layer on harmless prompts produces the refusal target;
- *retain loss*: ablating r̂ on harmless prompts leaves their next-token distribution in place
  (KL(steered ‖ unsteered), the argument order of their ``kl_div_fn`` call),
weighted 1, 0.2, 1 as theirs. A cone's loss is the mean over its basis rows plus the mean over
directions sampled in it (nonnegative combinations: |N(0, I_k)| normalised, their ``hypersphere``
sampling), so every direction of the cone must satisfy the losses. After each step the gradient's
radial part is removed, the update clipped (norm 10) and the basis re-orthonormalised (Gram–Schmidt),
with AdamW (β = 0.9, 0.98, amsgrad) and their patience schedule (lr ÷ 10 after ``patience`` steps
without a new lowest loss, at most ``n_lr_reduce`` times, then stop); the lowest-loss basis is kept.

Simplified for CPU (stated in the artifact's metadata): targets are *first tokens* — the model's own
greedy first token under DiM ablation (harmful) and under DiM addition (harmless), and the unsteered
next-token distribution for the retain KL — where the paper uses 30-token completions generated under
the same DiM edits; every step uses the same ``n_prompts`` prompts per class instead of shuffled
minibatches of the whole train split.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from refusal.errors import ConfigError, FitError
from refusal.fitting.steering import Steerable, unit_rows
from refusal.fitting.subspace import orthonormal_basis

log = logging.getLogger(__name__)

SIMPLIFICATION = ("first-token targets (greedy first token under DiM ablation / DiM addition, unsteered "
                  "next-token distribution for the retain KL) instead of 30-token generated targets; the same "
                  "n_prompts prompts per class at every step")
INITS = ("dim", "random")
ON_UNCONVERGED = ("error", "warn")


@dataclass
class RDOConfig:
    k: int = 1  # 1: one direction; > 1: a cone of that dimension
    steps: int = 40
    lr: float = 1e-2
    n_prompts: int = 16  # per class
    n_sample: int = 4  # directions sampled in the cone per step (theirs: 8); unused for k=1
    ablation_lambda: float = 1.0
    addition_lambda: float = 0.2
    retain_lambda: float = 1.0
    patience: int = 5
    n_lr_reduce: int = 2
    init: str = "dim"  # dim: row 1 starts at r̂_DiM (theirs), the others random; random: every row random
    seed: int = 0
    min_decrease: float = 0.05  # converged: lowest total loss <= (1 - min_decrease) x the starting loss
    on_unconverged: str = "error"  # error | warn

    def __post_init__(self) -> None:
        for key in ("k", "steps", "n_prompts", "n_sample", "patience", "n_lr_reduce", "seed"):
            value, least = getattr(self, key), 0 if key in ("n_lr_reduce", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"intervention.{key}={value!r} must be an integer >= {least}")
        for key in ("lr", "ablation_lambda", "addition_lambda", "retain_lambda", "min_decrease"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"intervention.{key}={value!r} must be a finite number >= 0")
        if self.min_decrease >= 1:
            raise ConfigError(f"intervention.min_decrease={self.min_decrease} must be < 1 (a share of the starting loss)")
        if self.init not in INITS:
            raise ConfigError(f"intervention.init={self.init!r} must be one of {INITS}")
        if self.on_unconverged not in ON_UNCONVERGED:
            raise ConfigError(f"intervention.on_unconverged={self.on_unconverged!r} must be one of {ON_UNCONVERGED}")

    @classmethod
    def from_cfg(cls, cfg: Any) -> RDOConfig:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{key: cfg[key] for key in cfg if key in names})


@dataclass
class RDOTargets:
    ablation: Int[Tensor, " n_harmful"]  # the compliant first token of each harmful prompt
    addition: Int[Tensor, " n_harmless"]  # the refusing first token of each harmless prompt
    retain_logits: Float[Tensor, "n_harmless vocab"]  # the unsteered harmless next-token logits


@dataclass
class RDOResult:
    basis: Float[Tensor, "k d_model"]  # orthonormal rows; k=1: the direction
    history: list[dict[str, float]] = field(default_factory=list)  # per step: total, ablation, addition, retain, lr
    best_step: int = 0
    converged: bool = True
    note: str = ""

    @property
    def initial_loss(self) -> float:
        return self.history[0]["total"]

    @property
    def best_loss(self) -> float:
        return self.history[self.best_step]["total"]


@torch.no_grad()
def model_targets(model: Steerable, dim_direction: Float[Tensor, " d_model"], layer: int) -> RDOTargets:
    """The CPU simplification of the paper's targets: first tokens the model itself gives under the DiM edits."""
    r = dim_direction[None].float()
    ablated = model.run("harmful", ablate=r).logits[0]
    added = model.run("harmless", add=r, add_layer=layer).logits[0]
    plain = model.run("harmless").logits[0]
    return RDOTargets(ablated.argmax(-1), added.argmax(-1), plain)


def retain_kl(steered: Float[Tensor, "*batch vocab"], base: Float[Tensor, "*batch vocab"]) -> Float[Tensor, " *batch"]:
    """KL(steered ‖ base) per row: their ``kl_div(log_softmax(base), softmax(steered))``."""
    log_p, log_q = steered.double().log_softmax(-1), base.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


#: The paper's three losses, each one pass (weighted by intervention.{name}_lambda).
LOSSES = ("ablation", "addition", "retain")


def direction_loss(name: str, model: Steerable, directions: Float[Tensor, "m d_model"], targets: RDOTargets,
                   alpha: float, layer: int) -> Float[Tensor, " m"]:
    """One of the three losses (``ablation``, ``retain``, ``addition``) of each of ``m`` directions: one batched,
    differentiable pass."""
    units = unit_rows(directions)
    m = len(units)
    if name == "ablation":
        harm = model.run("harmful", ablate=units).logits
        return F.cross_entropy(harm.flatten(0, 1), targets.ablation.repeat(m), reduction="none").view(m, -1).mean(1)
    if name == "retain":
        safe = model.run("harmless", ablate=units).logits
        return retain_kl(safe, targets.retain_logits.expand_as(safe)).mean(1).to(safe.dtype)
    if name == "addition":
        added = model.run("harmless", add=alpha * units, add_layer=layer).logits
        return F.cross_entropy(added.flatten(0, 1), targets.addition.repeat(m), reduction="none").view(m, -1).mean(1)
    raise ValueError(f"unknown RDO loss {name!r}; one of {LOSSES}")


def accumulate_losses(model: Steerable, basis: Float[Tensor, "k d_model"], mix: Float[Tensor, "m k"],
                      weights: Float[Tensor, " m"], lambdas: dict[str, float], targets: RDOTargets, alpha: float,
                      layer: int) -> dict[str, float]:
    """The weighted losses of the directions ``mix @ basis`` (basis rows and cone samples), their gradient added to
    ``basis.grad`` one direction and one loss at a time: the autograd graph of a single pass, not of all m
    directions' three passes at once (a k=3 cone with 4 samples on qwen05 needed > 24 GiB batched, ~10.7 GiB
    with one direction's three passes). Returns each loss's weighted sum over them."""
    parts = dict.fromkeys(lambdas, 0.0)
    for j in range(len(mix)):
        for name in lambdas:
            loss = direction_loss(name, model, mix[j:j + 1] @ basis, targets, alpha, layer)[0]
            part = weights[j].to(loss) * loss
            (lambdas[name] * part).backward()
            parts[name] += part.item()
    return parts


def cone_samples(k: int, n: int, generator: torch.Generator) -> Float[Tensor, "n k"]:
    """Nonnegative unit combinations of the k basis rows (their ``sample_hypersphere_gaussian``)."""
    s = torch.randn(n, k, generator=generator).abs()
    return s / s.norm(dim=1, keepdim=True)


def initial_basis(d_model: int, cfg: RDOConfig, dim_direction: Tensor, generator: torch.Generator) -> Tensor:
    rows = torch.randn(cfg.k, d_model, generator=generator)
    if cfg.init == "dim":
        rows[0] = dim_direction.float()
    return orthonormal_basis(rows, "RDO initial basis", "change intervention.seed")


@dataclass
class RDOState:
    """All a step leaves for the next (basis, Adam's moments, the sampling generator, the patience schedule), so a
    fit resumed from it continues exactly as if it had not stopped."""
    basis: Float[Tensor, "k d_model"]
    best_basis: Float[Tensor, "k d_model"]
    adam: dict[str, Tensor]  # AdamW's per-parameter state (step, exp_avg, exp_avg_sq, max_exp_avg_sq)
    generator: Tensor  # torch.Generator.get_state()
    history: list[dict[str, float]]
    best: float
    waited: int
    reduced: int
    lr: float  # the schedule's current rate (after any reduction this step made)


class RDOProgress(Protocol):
    """Where ``optimise`` keeps its state after every step (``refusal.fits``: a checksummed artifact)."""

    def load(self) -> RDOState | None: ...

    def save(self, state: RDOState) -> None: ...


def optimise(model: Steerable, dim_direction: Float[Tensor, " d_model"], layer: int, targets: RDOTargets,
             cfg: RDOConfig, progress: RDOProgress | None = None) -> RDOResult:
    """Train a direction (k=1) or a cone's basis; the lowest-loss basis, the loss history and whether it converged.
    With ``progress``, each step's state is saved and a stopped fit continues from its last step (a k=3 cone on
    qwen15 is hours on 2 cores)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    alpha = float(dim_direction.norm())
    basis = initial_basis(model.d_model, cfg, dim_direction, generator).requires_grad_(True)
    optimizer = torch.optim.AdamW([basis], lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True)
    n_sample = cfg.n_sample if cfg.k > 1 else 0
    weights = torch.cat([torch.full((cfg.k,), 1.0 / cfg.k), torch.full((n_sample,), 1.0 / max(n_sample, 1))])
    lambdas = {"ablation": cfg.ablation_lambda, "addition": cfg.addition_lambda, "retain": cfg.retain_lambda}
    history: list[dict[str, float]] = []
    best, best_basis, waited, reduced = math.inf, basis.detach().clone(), 0, 0
    if progress is not None and (state := progress.load()) is not None:
        with torch.no_grad():
            basis.copy_(state.basis)
        optimizer.state[basis] = {key: value.clone() for key, value in state.adam.items()}
        generator.set_state(state.generator)
        history, best, best_basis, waited, reduced = list(state.history), state.best, state.best_basis, state.waited, state.reduced
        optimizer.param_groups[0]["lr"] = state.lr
        log.info("RDO (k=%d) resumed after step %d/%d", cfg.k, len(history), cfg.steps)
    while len(history) < cfg.steps:
        mix = torch.eye(cfg.k) if n_sample == 0 else torch.cat([torch.eye(cfg.k), cone_samples(cfg.k, n_sample, generator)])
        optimizer.zero_grad()
        parts = accumulate_losses(model, basis, mix, weights, lambdas, targets, alpha, layer)
        total = sum(lambdas[name] * part for name, part in parts.items())
        history.append({"total": total, **parts, "lr": optimizer.param_groups[0]["lr"]})
        log.info("RDO (k=%d) step %d/%d: total %.4f (ablation %.4f, addition %.4f, retain %.4f), lr %.0e", cfg.k,
                 len(history), cfg.steps, total, parts["ablation"], parts["addition"], parts["retain"], history[-1]["lr"])
        if history[-1]["total"] < best:
            best, best_basis, waited = history[-1]["total"], basis.detach().clone(), 0
        else:
            waited += 1
        if waited >= cfg.patience:
            if reduced >= cfg.n_lr_reduce:
                break
            reduced, waited = reduced + 1, 0
            optimizer.param_groups[0]["lr"] /= 10
        with torch.no_grad():
            grad = basis.grad
            grad -= (grad * basis).sum(-1, keepdim=True) * basis  # tangent to each unit row
            torch.nn.utils.clip_grad_norm_([basis], 10.0)
        optimizer.step()
        with torch.no_grad():
            basis.copy_(orthonormal_basis(basis, f"RDO basis (k={cfg.k}) after step {len(history)}",
                                          "lower intervention.lr or intervention.k"))
        if progress is not None:
            progress.save(RDOState(basis.detach().clone(), best_basis, dict(optimizer.state[basis]), generator.get_state(),
                                   history, best, waited, reduced, optimizer.param_groups[0]["lr"]))
    best_step = min(range(len(history)), key=lambda i: history[i]["total"])
    result = RDOResult(best_basis, history, best_step)
    result.converged = result.best_loss <= (1.0 - cfg.min_decrease) * result.initial_loss
    if not result.converged:
        result.note = (f"RDO (k={cfg.k}) did not converge: lowest total loss {result.best_loss:.4f} (step {best_step}) is "
                       f"not below (1 - min_decrease={cfg.min_decrease}) x the starting {result.initial_loss:.4f} "
                       f"after {len(history)} steps (ablation {history[0]['ablation']:.4f} -> "
                       f"{history[best_step]['ablation']:.4f}, addition {history[0]['addition']:.4f} -> "
                       f"{history[best_step]['addition']:.4f}, retain {history[0]['retain']:.4f} -> "
                       f"{history[best_step]['retain']:.4f}); raise intervention.steps or intervention.lr, "
                       "or set intervention.on_unconverged=warn to use it anyway")
    orthonormal_basis(result.basis, f"RDO basis (k={cfg.k})", "lower intervention.k")  # rank k, or a FitError
    return result


def report_convergence(result: RDOResult, cfg: RDOConfig) -> None:
    """Non-convergence is an error by default (a warning with ``on_unconverged=warn``); either way the numbers."""
    if result.converged:
        return
    if cfg.on_unconverged == "error":
        raise FitError(result.note)
    warnings.warn(result.note, stacklevel=2)


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No weight gradients while directions are trained (the flags restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():  # trainable even when called under inference mode
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
