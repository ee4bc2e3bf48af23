"""The contract every intervention follows.

An intervention is built from its Hydra config plus the fitted artifacts it declares in
``needs``. It says what it does to the residual stream at one layer (:meth:`residual_edit`,
and for projections :meth:`write_edit` on the block's attention/MLP outputs); *where* it does it
is its :class:`~refusal.interventions.scope.Scope` (``intervention.layers`` and
``intervention.positions``), which the base class turns into hooks, so every intervention,
plugins included, takes every scope. A plugin that acts elsewhere (attention heads, weights)
builds its own hooks in :meth:`hook_specs` instead; it must provide at least one of the three.
Applying it is a context manager: hooks on enter, all removed on exit, even on error. Each hook's
first output is checked (shape, dtype, device, finite) and a bad one is an
:class:`~refusal.errors.InterventionError` naming the intervention and the hook. Any subclass that
sets ``name`` registers itself, so a plugin file only has to define the class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float

from refusal.errors import ConfigError, InterventionError
from refusal.fitting.results import DiMDirection, DiMMeans, Fitted  # noqa: F401  (DiMDirection, DiMMeans: kept importable from here)
from refusal.interventions.registry import register
from refusal.interventions.scope import Scope, check_layer
from refusal.models.bundle import ModelBundle
from refusal.models.placement import module_device, module_dtype
from refusal.runtime.hooks import Check, HookSpec, TensorFn, hooked
from refusal.runtime.roles import at_positions

#: Moves a fitted tensor to where the edit runs (the hooked module's device and dtype, or a given tensor's).
Cast = Callable[[torch.Tensor], torch.Tensor]


#: What a subclass implements, at least one of: an edit placed by its scope, or its own hooks.
EDIT_METHODS = ("residual_edit", "write_edit", "hook_specs")


class Intervention:
    """Base class. Subclasses set ``name``, ``description``, ``needs`` and implement at least one of
    :meth:`residual_edit`, :meth:`write_edit` (alone: applied to the writes of every layer in scope)
    or :meth:`hook_specs`.

    ``default_layers`` is the layer scope when the config gives none (``selected`` or ``all``);
    ``edits_writes`` marks projections: at ``layers=all`` they are also applied to every block's
    attention/MLP outputs, so the removed component is zero everywhere in the residual stream
    (Arditi et al.'s ablation). An additive or reflecting edit is not: it would compound.
    """

    name: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    default_layers: ClassVar[str] = "selected"
    edits_writes: ClassVar[bool] = False
    #: ``k`` picks the leading INLP directions, so it is bounded by what INLP can fit (not e.g. a random control's k).
    k_counts_inlp_directions: ClassVar[bool] = False
    #: Parameters and their defaults: the Hydra config of ``intervention=<name>`` when no yaml exists.
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: False only for a baseline: its generations are the unsteered ones (cached and compared as such).
    steers: ClassVar[bool] = True

    @classmethod
    def fit_extra(cls, ctx: Any, fitted: Fitted, cfg: Mapping[str, Any]) -> Any:
        """An intervention's own fit, for what ``needs`` cannot name (several directions, optimised ones):
        called after the fits in ``needs`` with the run's :class:`~refusal.context.RunContext` (model,
        splits, activation cache, artifact folder) and the intervention's config; what it returns is
        ``fitted.extra[cls.name]``. The default fits nothing (and is not called)."""
        return None

    def __init__(self, cfg: Mapping[str, Any], fitted: Fitted):
        _require_an_edit(type(self))
        self.cfg = dict(cfg)
        self.fitted = fitted
        missing = [need for need in sorted(self.needs) if getattr(fitted, need, None) is None]
        if missing:
            raise ConfigError(f"intervention {self.name!r} needs fitted {missing}; run train.py or let evaluate.py fit them")
        self.scope = Scope.from_config(self.cfg, self.default_layers)
        layer = check_layer(self.cfg.get("layer"))
        self._layer = layer if layer is not None else (fitted.dim.layer if fitted.dim is not None else None)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            _require_an_edit(cls)
            register(cls)

    @classmethod
    def check_params(cls, cfg: Mapping[str, Any], n_layers: int | None) -> None:
        """Optional: raise a :class:`ConfigError` for bad parameters before the model loads and anything is
        fitted (``n_layers`` is the model config's, None when unknown). The default checks nothing."""

    # -- what subclasses provide (at least one) ------------------------------------------------
    def residual_edit(self, layer: int, cast: Cast) -> TensorFn | None:
        """The edit of the residual stream at the input of block ``layer`` (None: leave it alone).

        ``cast`` moves a fitted tensor to where the edit runs; call it once here, never per forward.
        """
        return None

    def write_edit(self, layer: int, cast: Cast) -> TensorFn | None:
        """For projections: the edit of block ``layer``'s attention/MLP outputs (the linear part)."""
        return None

    @property
    def layer(self) -> int | None:
        """The layer whose input this intervention edits (for geometry): ``intervention.layer`` or the DiM layer."""
        return self._layer

    def layers(self, n_layers: int) -> list[int]:
        """The layers in scope, concretely. A plugin that builds its own hooks places them itself: with
        no selected layer to resolve ``selected`` against, it reports none."""
        if self.scope.layers == "selected" and self._layer is None and _overrides(type(self), "hook_specs"):
            return []
        return self.scope.resolve(n_layers, self._layer)

    def transform(self, x: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_model"]:
        """The edit at :attr:`layer` applied to residual activations (e.g. cached ones)."""
        fn = self.residual_edit(self._layer, lambda t: t.to(x)) if self._layer is not None else None
        return x if fn is None else fn(x)

    def expected_landing(self, delta: Float[torch.Tensor, " d_model"]) -> dict[str, float] | None:
        """What the edit predicts for the landing coordinate t along ``delta`` (the DiM mean difference),
        for symmetric clusters; None where there is no such prediction."""
        return None

    def steering_key(self, n_layers: int) -> str | None:
        """What steered generations are cached under (:meth:`fingerprint`); None when this does not steer."""
        return self.fingerprint(n_layers) if self.steers else None

    def export_weights(self, bundle: ModelBundle, out_dir: Path) -> Path | None:
        """Bake the edit into a copy of the model's weights (``intervention.export=true``); None where it
        cannot be (only an edit that is the same linear map at every layer and position can)."""
        return None

    def params(self) -> dict[str, Any]:
        """Parameters worth recording in results: the config minus its name, scope only where not the default."""
        out = {k: v for k, v in self.cfg.items() if k not in ("name", "layers", "positions")}
        if self.scope.layers != self.default_layers:
            out["layers"] = self.scope.layers if isinstance(self.scope.layers, str) else list(self.scope.layers)
        if self.scope.positions != "all":
            out["positions"] = self.scope.positions
        return out

    def fingerprint(self, n_layers: int) -> str:
        """Digest of everything the steered model depends on: the source of this class and of the
        hook machinery, its config, its concrete scope and every fitted tensor it could read. Steered
        generations are cached under it, so a changed plugin, parameter or fit never reuses them."""
        digest = hashlib.sha256()
        modules = {c.__module__ for c in type(self).__mro__ if c.__module__ not in ("builtins", "abc")}
        for name in sorted(modules | {hooked.__module__, Scope.__module__, at_positions.__module__}):
            digest.update(inspect.getsource(sys.modules[name]).encode())
        digest.update(json.dumps({"cfg": self.cfg, "layers": self.layers(n_layers), "positions": self.scope.positions},
                                 sort_keys=True, default=str).encode())
        for path, tensor in _tensors(self.fitted):
            digest.update(path.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    # -- shared machinery ---------------------------------------------------------------------
    def hook_specs(self, bundle: ModelBundle) -> list[HookSpec]:
        """The hooks that implement this intervention on ``bundle``'s model, in its scope.

        Each hook's constants are placed once, here, on its own module's device and dtype (a model that
        ``model.device_map`` spread over GPUs has blocks on several), so a hook call converts nothing.
        A plugin that acts elsewhere (attention heads, weights) overrides this; :meth:`apply` still
        checks each of its hooks' first output and removes them all on exit. A position-masked edit
        checks its own first output here (before the mask, where a wrong shape could broadcast).
        """
        layout, specs = bundle.layout, []
        positions = self.scope.positions
        writes_only = _overrides(type(self), "write_edit") and not _overrides(type(self), "residual_edit")
        project_writes = writes_only or (self.edits_writes and self.scope.layers == "all")
        spread = bundle.spans_devices
        for layer in self.layers(bundle.n_layers):
            block = layout.blocks[layer]
            where = self._placement(block, bundle)
            edit = self.residual_edit(layer, self._cast_to(where, bundle))
            if edit is not None:
                masked = at_positions(edit, positions, self._output_check(bundle, block, "pre"))
                specs.append(HookSpec(block, masked, "pre", where[0] if spread else None))
            if not project_writes:
                continue
            writes: dict[tuple[torch.device, torch.dtype], TensorFn | None] = {}  # attention and MLP share one
            for writer in (layout.attn_writers[layer], layout.mlp_writers[layer]):
                where = self._placement(writer, bundle)
                if where not in writes:
                    writes[where] = self.write_edit(layer, self._cast_to(where, bundle))
                if writes[where] is not None:
                    masked = at_positions(writes[where], positions, self._output_check(bundle, writer, "post"))
                    specs.append(HookSpec(writer, masked, "post"))
        return specs

    @contextmanager
    def apply(self, bundle: ModelBundle) -> Iterator[None]:
        """Hooks on, yield, hooks off (always). Every hook checks its first output (see :meth:`_output_check`)."""
        specs = [spec if spec.check is not None else
                 dataclasses.replace(spec, check=self._output_check(bundle, spec.module, spec.kind))
                 for spec in self.hook_specs(bundle)]
        with hooked(specs):
            yield

    def _output_check(self, bundle: ModelBundle, module: torch.nn.Module, kind: str) -> Check:
        """A first-call check of an edit's output, whose error names this intervention and the hooked
        module (a plugin's bad edit would otherwise fail deep inside the model, or look like its dtype's fault)."""
        def check(x: torch.Tensor, out: torch.Tensor) -> None:
            problem = output_problem(x, out)
            if problem is not None:
                raise InterventionError(f"intervention {self.name or type(self).__name__!r} at "
                                        f"{hooked_label(bundle, module, kind)} {problem}")

        return check

    @staticmethod
    def _placement(module: torch.nn.Module, bundle: ModelBundle) -> tuple[torch.device, torch.dtype]:
        return module_device(module, bundle.device), module_dtype(module, bundle.dtype)

    def _cast_to(self, where: tuple[torch.device, torch.dtype], bundle: ModelBundle) -> Cast:
        """Moves a fitted tensor to ``where`` (a hooked module's device and dtype), once, when the hook is built."""
        device, dtype = where

        def cast(value: torch.Tensor) -> torch.Tensor:
            if value.shape[-1] != bundle.d_model:
                raise ConfigError(
                    f"{self.name}: fitted tensor has d_model={value.shape[-1]} but {bundle.name} has {bundle.d_model}; "
                    "the artifact belongs to another model, refit it"
                )
            return value.to(device=device, dtype=dtype)

        return cast


def _overrides(cls: type, method: str) -> bool:
    return getattr(cls, method) is not getattr(Intervention, method)


def _require_an_edit(cls: type) -> None:
    """Fail where the class is defined (or built), not with a no-op or a raw error mid-run."""
    if not any(_overrides(cls, method) for method in EDIT_METHODS):
        raise InterventionError(f"intervention {getattr(cls, 'name', None) or cls.__name__!r} defines none of "
                                f"{', '.join(EDIT_METHODS)}; implement one")


def output_problem(x: torch.Tensor, out: Any) -> str | None:
    """What is wrong with ``out`` as the edit of ``x``, or None. Non-finite values count only when ``x``
    was finite: a model that overflowed on its own is not the edit's fault."""
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, expected a tensor shaped like its input; an edit must return a tensor"
    if out.shape != x.shape:
        return (f"returned shape {tuple(out.shape)}, expected {tuple(x.shape)} (its input's); "
                "an edit must return a tensor shaped like its input")
    if out.dtype != x.dtype or out.device != x.device:
        return (f"returned {out.dtype} on {out.device}, expected {x.dtype} on {x.device} (its input's); "
                "build its constants with `cast` (or on the hooked module's device and dtype)")
    if out.is_meta:  # a module placed on the meta device (offloaded, or a test split) has no values to check
        return None
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(x).all()):
        return "returned non-finite values (NaN or inf) from a finite input; check its parameters and fitted tensors"
    return None


def hooked_label(bundle: ModelBundle, module: torch.nn.Module, kind: str) -> str:
    """Where a hook sits, for messages: "layer 3 (block input)", "layer 0 (MLP output)" or a module path."""
    side = "input" if kind == "pre" else "output"
    layout = bundle.layout
    for what, modules in (("block", layout.blocks), ("attention", layout.attn_writers), ("MLP", layout.mlp_writers)):
        for layer, candidate in enumerate(modules):
            if candidate is module:
                return f"layer {layer} ({what} {side})"
    path = next((name for name, m in bundle.model.named_modules() if m is module), type(module).__name__)
    return f"{path or 'the model'} ({side})"


def _tensors(value: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside ``value`` (dataclasses, plain objects, dicts, lists), with a stable path."""
    if isinstance(value, torch.Tensor):
        yield path, value
        return
    if depth > 8 or isinstance(value, (str, bytes, int, float, bool, type, torch.nn.Module)) or value is None:
        return
    if isinstance(value, Mapping):
        items = [(f"[{k}]", value[k]) for k in sorted(value, key=str)]
    elif isinstance(value, (list, tuple)):
        items = [(f"[{i}]", v) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(value):
        items = [(f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    else:
        items = [(f".{k}", v) for k, v in sorted(getattr(value, "__dict__", {}).items())]
    for suffix, item in items:
        yield from _tensors(item, path + suffix, depth + 1)
