"""Weight-expressible directional ablation: per-write directions and strengths, hooks equal to edited weights.

An :class:`AblationPlan` says, for the token embedding and for every attention/MLP output
projection (``o_proj`` / ``down_proj``), which unit direction u to remove and how strongly:
W ← (I − w·uuᵀ)W (w = 1: Arditi et al.'s orthogonalisation; 0 < w < 1 partial; 1 < w ≤ 2 past it,
2 being the reflection). With ``preserve="columns"`` each *column* of the edited W (the vector one
input neuron writes into the residual stream; for the embedding, each token's row) is then scaled
back to the length it had: grimjim's "norm-preserving biprojected abliteration", as abliterix
1.12.2 implements it for output-side directions (``abliterix/weight_transforms.py``,
``apply_biprojected_transform``, the ``d.shape[0] == out_f`` branch: column norms N = ‖W‖ over
dim 0, Ŵ − strength·û⊗(ûŴ), columns renormalised, times N), exactly (no low-rank approximation):
W' = (I − w·uuᵀ) W diag(s), s_j = ‖c_j‖ / ‖(I − w·uuᵀ)c_j‖; at w = 1 the rescaled columns stay orthogonal
to u, so the write still has no component along it. ``preserve="rows"`` is heretic 1.4.0's default,
``row_normalization="full"`` (``heretic/model.py``, ``Model.abliterate``): the rows of W (one per
residual coordinate) are normalised, the edit applied, the rows renormalised and scaled back to their
old norms: W' = diag(g)(I − w·uuᵀ)diag(1/n)W, n_i = ‖W_i‖, g_i = n_i / ‖((I − w·uuᵀ)diag(1/n)W)_i‖.
heretic stores W' − W as a rank-3 LoRA approximation (``full_normalization_lora_rank``); here it is exact.

The hooks (:class:`PlanAblation`) do on activations what the edited weights do (a pre-hook scales
the projection's input by s, a post-hook removes w·(y·u)u from its output; for rows, the post-hook
divides y − b by n, ablates, multiplies by g and adds the projected bias), so
:func:`refusal.interventions.export.apply_plan_` bakes the same plan into a checkpoint whose logits
equal the hooked model's. Biases, when present, are projected and not rescaled, in every form.

Directions come from :func:`projected_direction` (grimjim's "projected abliteration": r̂ minus its
component along the normalised harmless mean) and :func:`interpolated_direction` (heretic's
fractional direction index); strengths from :func:`heretic_weight` (heretic's per-layer kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from refusal.errors import ConfigError
from refusal.interventions.base import Intervention
from refusal.models.bundle import ModelBundle
from refusal.models.placement import module_device, module_dtype
from refusal.runtime.hooks import HookSpec, TensorFn
from refusal.runtime.roles import at_positions

Part = Literal["attn", "mlp"]
#: What an edit keeps: nothing, each column's norm (abliterix's biprojected) or each row's (heretic's).
Preserve = Literal["none", "columns", "rows"]
#: Below this fraction of r̂'s length, r' = r̂ − (r̂·μ̂)μ̂ is numerical noise: no direction is left to ablate.
MIN_PROJECTED_NORM = 1e-3
#: Below this fraction of its old norm an edited column (row) counts as removed: it is not rescaled.
VANISHED = 1e-6
#: The largest strength: w = 2 reflects the component along u; beyond it the component grows again.
MAX_WEIGHT = 2.0


@dataclass(frozen=True)
class WriteEdit:
    """Remove ``weight``·(component along ``unit``) from one matrix's output, keeping the norms ``preserve`` names."""

    unit: Float[Tensor, " d_model"]
    weight: float = 1.0
    preserve: Preserve = "none"


@dataclass
class AblationPlan:
    """Every residual write this ablation edits: the embedding (or None) and ``writes[(layer, part)]``."""

    embedding: WriteEdit | None = None
    writes: dict[tuple[int, Part], WriteEdit] = field(default_factory=dict)


def writer_linear(module: nn.Module) -> nn.Linear:
    """The output projection of an attention or MLP block (what writes into the residual stream)."""
    for name in ("o_proj", "down_proj", "dense", "out_proj"):
        if isinstance(getattr(module, name, None), nn.Linear):
            return getattr(module, name)
    raise ConfigError(f"cannot find the output projection of {type(module).__name__}")


# -- directions ---------------------------------------------------------------------------------------
def projected_direction(
    direction: Float[Tensor, " d_model"], harmless_mean: Float[Tensor, " d_model"], where: str = "",
) -> Float[Tensor, " d_model"]:
    """r' = r̂ − (r̂·μ̂)μ̂, renormalised: the refusal direction without its share of the harmless mean.

    grimjim's projected abliteration as heretic 1.4.0 applies it (``heretic/main.py``, ``run``, under
    ``settings.orthogonalize_direction``; abliterix's ``projected_abliteration`` in ``abliterix/vectors.py``
    is the same): ablating r' leaves the harmless mean's own direction untouched. A direction (nearly)
    parallel to μ leaves nothing: a :class:`ConfigError` with the numbers, not a division by ~0.
    """
    r = direction.double() / direction.double().norm()
    mu_norm = harmless_mean.double().norm()
    if not bool(torch.isfinite(r).all()) or float(mu_norm) == 0.0:
        raise ConfigError(f"projected ablation{where}: the refusal direction (norm {float(direction.norm()):.3g}) or the "
                          f"harmless mean (norm {float(mu_norm):.3g}) is zero; refit, or set intervention.projected=false")
    mu = harmless_mean.double() / mu_norm
    cosine = float(r @ mu)
    rest = r - cosine * mu
    if float(rest.norm()) < MIN_PROJECTED_NORM:
        raise ConfigError(
            f"projected ablation{where}: the refusal direction is parallel to the harmless mean (cosine {cosine:.6f}), so "
            f"r' = r̂ − (r̂·μ̂)μ̂ has norm {float(rest.norm()):.2e} < {MIN_PROJECTED_NORM}: nothing is left to ablate; "
            "set intervention.projected=false or pick another layer/position (layer=...)")
    return (rest / rest.norm()).to(direction.dtype)


def interpolated_direction(
    directions: Float[Tensor, "sites d_model"], index: float,
) -> Float[Tensor, " d_model"]:
    """heretic's fractional direction index (``heretic/model.py``, ``Model.abliterate``): with
    ``weight, i = modf(index + 1)``, normalize(lerp(directions[i], directions[i + 1], weight)).

    ``directions[j]`` is the residual at hidden-state index j (0: embeddings, j: block j−1's output),
    so ``index`` = 11.0 is block 11's output and 11.3 lies 30% of the way to block 12's.
    """
    n_sites = directions.shape[0]
    if isinstance(index, bool) or not isinstance(index, (int, float)) or not math.isfinite(index) \
            or not 0 <= index < n_sites - 2:
        raise ConfigError(f"intervention.direction_index={index!r} must be a layer index in [0, {n_sites - 2}) "
                          "(heretic's direction_index: it interpolates between block floor(d)'s and the next block's output)")
    weight, whole = math.modf(index + 1)
    i = int(whole)
    mixed = directions[i].lerp(directions[i + 1], weight) if weight else directions[i]
    return mixed / mixed.norm()


# -- heretic's kernel ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """heretic 1.4.0's per-layer ablation weight (``heretic/model.py``: ``AbliterationParameters`` and the
    loop in ``Model.abliterate``), one per component (attention output, MLP output).

    distance = |layer − max_weight_position|; no edit when distance > min_weight_distance, else
    w = max_weight + (distance / min_weight_distance)·(min_weight − max_weight). ``min_weight`` is the
    absolute weight (heretic's search samples it as a fraction of max_weight and multiplies, main.py).
    """

    max_weight: float = 1.0
    max_weight_position: float = 0.0
    min_weight: float = 1.0
    min_weight_distance: float = 1.0

    def check(self, n_layers: int, prefix: str) -> None:
        """One clear error per out-of-range parameter (named as in the config, with the fix)."""
        for name in ("max_weight", "min_weight"):
            value = getattr(self, name)
            if not 0.0 <= value <= MAX_WEIGHT:
                raise ConfigError(f"intervention.{prefix}{name}={value:g} must be in [0, {MAX_WEIGHT:g}] "
                                  "(1 removes the component, 2 reflects it); pick a weight in that range")
        if not 0.0 <= self.max_weight_position <= n_layers - 1:
            raise ConfigError(f"intervention.{prefix}max_weight_position={self.max_weight_position:g} is out of range "
                              f"for a model with {n_layers} layers (use 0..{n_layers - 1}, or null for the DiM layer)")
        if not self.min_weight_distance > 0:
            raise ConfigError(f"intervention.{prefix}min_weight_distance={self.min_weight_distance:g} must be > 0 "
                              "(layers farther than it from max_weight_position are left alone); use e.g. 1, "
                              "or null for every layer")

    def weight(self, layer: int) -> float | None:
        """The strength at ``layer`` (None: this layer is left alone)."""
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return None
        return self.max_weight + (distance / self.min_weight_distance) * (self.min_weight - self.max_weight)


# -- the edits, as functions of tensors (hooks) and of weights (export) -------------------------------
def column_scales(
    weight: Float[Tensor, "d_model d_in"], unit: Float[Tensor, " d_model"], strength: float,
) -> Float[Tensor, " d_in"]:
    """s_j = ‖c_j‖ / ‖(I − w·uuᵀ)c_j‖ for the columns c_j of ``weight`` (1 where the edited column vanishes)."""
    w, u = weight.double(), unit.to(weight.device, torch.float64)
    return norm_ratio(w, w - strength * torch.outer(u, u @ w), dim=0)


def row_scales(
    weight: Float[Tensor, "d_model d_in"], unit: Float[Tensor, " d_model"], strength: float,
) -> tuple[Float[Tensor, " d_model"], Float[Tensor, " d_model"]]:
    """heretic's row normalisation: (n, g), n_i = ‖W_i‖ (1 for a zero row) and g_i = n_i / ‖E_i‖ with
    E = (I − w·uuᵀ)diag(1/n)W (1 where E_i vanished), so that W' = diag(g)(I − w·uuᵀ)diag(1/n)W."""
    w, u = weight.double(), unit.to(weight.device, torch.float64)
    norms = w.norm(dim=1)
    norms = torch.where(norms > 0, norms, 1.0)
    normalised = w / norms.unsqueeze(1)
    edited = normalised - strength * torch.outer(u, u @ normalised)
    return norms, norms * norm_ratio(normalised, edited, dim=1)


def norm_ratio(before: Tensor, after: Tensor, dim: int) -> Tensor:
    """‖before‖ / ‖after‖ along ``dim``; 1 where ``after`` vanished (below :data:`VANISHED` of its old norm): a
    column (row) along u that the edit removed stays removed instead of blowing rounding residue up to full length."""
    old, new = before.norm(dim=dim), after.norm(dim=dim)
    alive = new > VANISHED * old
    return torch.where(alive, old / torch.where(alive, new, 1.0), 1.0)


def ablate(x: Float[Tensor, "*batch d_model"], unit: Float[Tensor, " d_model"], strength: float) -> Float[Tensor, "*batch d_model"]:
    """x − w·(x·u)u over the last dimension."""
    return x - strength * (x @ unit).unsqueeze(-1) * unit


def ablate_rows_keep_norm(x: Float[Tensor, "*batch d_model"], unit: Float[Tensor, " d_model"],
                          strength: float) -> Float[Tensor, "*batch d_model"]:
    """:func:`ablate`, each row then scaled back to its own length (the embedding's norm-preserving edit)."""
    edited = ablate(x, unit, strength)
    return edited * norm_ratio(x, edited, dim=-1).unsqueeze(-1).to(edited.dtype)


class PlanAblation(Intervention):
    """Base of the weight-expressible ablations (no ``name``: not registered itself). A subclass builds
    its :class:`AblationPlan` in :meth:`weight_plan`; hooks (here) and export apply the same plan.

    ``intervention.layers`` picks the layers whose writes are edited (the embedding counts as layer 0);
    ``intervention.positions`` masks the hooks (export needs both at ``all``, as ``config`` checks).
    """

    default_layers = "all"

    def weight_plan(self, n_layers: int) -> AblationPlan:
        raise NotImplementedError

    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        plan, layout, positions = self.weight_plan(bundle.n_layers), bundle.layout, self.scope.positions
        in_scope = set(self.layers(bundle.n_layers))
        specs: list[HookSpec] = []

        def place(module: nn.Module, fn: TensorFn, kind: str) -> None:
            specs.append(HookSpec(module, at_positions(fn, positions, self._output_check(bundle, module, kind)), kind))

        def cast_for(module: nn.Module):
            where = (module_device(module, bundle.device), module_dtype(module, bundle.dtype))
            return self._cast_to(where, bundle)

        if plan.embedding is not None and 0 in in_scope:
            edit, cast = plan.embedding, cast_for(layout.embedding)
            if edit.preserve == "rows":
                raise ConfigError(f"{self.name}: row norm preservation (heretic's) edits attention/MLP writes only; "
                                  "set intervention.embedding=false or norm_preserving=true")
            unit, fn = cast(edit.unit), ablate_rows_keep_norm if edit.preserve == "columns" else ablate
            place(layout.embedding, lambda x, u=unit, w=edit.weight, f=fn: f(x, u, w), "post")
        for (layer, part), edit in sorted(plan.writes.items()):
            if layer not in in_scope:
                continue
            linear = writer_linear((layout.attn_writers if part == "attn" else layout.mlp_writers)[layer])
            cast = cast_for(linear)
            unit = cast(edit.unit)
            if edit.preserve == "rows":
                place(linear, self._row_preserving(linear, edit, cast), "post")
                continue
            if edit.preserve == "columns":
                scales = column_scales(linear.weight.detach(), edit.unit, edit.weight).to(unit)
                place(linear, lambda x, s=scales: x * s, "pre")
            place(linear, lambda y, u=unit, w=edit.weight: ablate(y, u, w), "post")
        return specs

    @staticmethod
    def _row_preserving(linear: nn.Linear, edit: WriteEdit, cast) -> TensorFn:
        """y ↦ g·ablate((y − b)/n) + ablate(b): what W' = diag(g)(I − w·uuᵀ)diag(1/n)W and the projected bias give."""
        norms, gains = (cast(t) for t in row_scales(linear.weight.detach(), edit.unit, edit.weight))
        unit = cast(edit.unit)
        if linear.bias is None:
            return lambda y: ablate(y / norms, unit, edit.weight) * gains
        bias = linear.bias.detach().to(unit)
        projected_bias = ablate(bias, unit, edit.weight)  # once, not per forward pass
        return lambda y: ablate((y - bias) / norms, unit, edit.weight) * gains + projected_bias
