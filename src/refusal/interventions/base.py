"""The contract every intervention follows.

An intervention is built from its Hydra config plus the fitted artifacts it declares in
``needs``. It says what it does to the residual stream at one layer (:meth:`residual_edit`,
and for projections :meth:`write_edit` on the block's attention/MLP outputs); *where* it does it
is its :class:`~refusal.interventions.scope.Scope` (``intervention.layers`` and
``intervention.positions``), which the base class turns into hooks, so every intervention,
plugins included, takes every scope. Applying it is a context manager: hooks on enter, all removed
on exit, even on error. Any subclass that sets ``name`` registers itself, so a plugin file only has
to define the class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Float

from refusal.errors import ConfigError
from refusal.hooks import HookSpec, TensorFn, hooked
from refusal.interventions.scope import Scope, at_positions
from refusal.models.bundle import ModelBundle
from refusal.models.placement import module_device, module_dtype

#: Moves a fitted tensor to where the edit runs (the hooked module's device and dtype, or a given tensor's).
Cast = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DiMDirection:
    """A difference-in-means refusal direction r (unnormalised) read at one layer and position."""

    direction: Float[torch.Tensor, " d_model"]
    layer: int
    position: int  # negative offset into the post-instruction tokens

    @property
    def unit(self) -> Float[torch.Tensor, " d_model"]:
        return self.direction / self.direction.norm()


@dataclass
class Fitted:
    """Everything fitted that interventions may need; ``None`` where not fitted.

    ``inlp`` is the INLP fit at the DiM layer; ``inlp_by_layer`` holds one fit per layer when
    ``fit.inlp.per_layer=true`` (each layer's own centre, signs and directions).
    """

    dim: DiMDirection | None = None
    inlp: Any = None  # refusal.fitting.inlp.INLPResult
    inlp_layer: int | None = None
    inlp_by_layer: dict[int, Any] = field(default_factory=dict)
    leace: Any = None  # refusal.fitting.leace.LEACEResult


class Intervention(ABC):
    """Base class. Subclasses set ``name``, ``description``, ``needs`` and implement :meth:`residual_edit`.

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
    #: Parameters and their defaults: the Hydra config of ``intervention=<name>`` when no yaml exists.
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, cfg: Mapping[str, Any], fitted: Fitted):
        self.cfg = dict(cfg)
        self.fitted = fitted
        missing = [need for need in sorted(self.needs) if getattr(fitted, need, None) is None]
        if missing:
            raise ConfigError(f"intervention {self.name!r} needs fitted {missing}; run train.py or let evaluate.py fit them")
        self.scope = Scope.from_config(self.cfg, self.default_layers)
        layer = self.cfg.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ConfigError(f"intervention.layer={layer!r} must be an integer, or null for the DiM layer")
        self._layer = int(layer) if layer is not None else (fitted.dim.layer if fitted.dim is not None else None)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            from refusal.interventions.registry import register

            register(cls)

    # -- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def residual_edit(self, layer: int, cast: Cast) -> TensorFn | None:
        """The edit of the residual stream at the input of block ``layer`` (None: leave it alone).

        ``cast`` moves a fitted tensor to where the edit runs; call it once here, never per forward.
        """

    def write_edit(self, layer: int, cast: Cast) -> TensorFn | None:
        """For projections: the edit of block ``layer``'s attention/MLP outputs (the linear part)."""
        return None

    @property
    def layer(self) -> int | None:
        """The layer whose input this intervention edits (for geometry): ``intervention.layer`` or the DiM layer."""
        return self._layer

    def layers(self, n_layers: int) -> list[int]:
        """The layers in scope, concretely."""
        return self.scope.resolve(n_layers, self._layer)

    def transform(self, x: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_model"]:
        """The edit at :attr:`layer` applied to residual activations (e.g. cached ones)."""
        fn = self.residual_edit(self._layer, lambda t: t.to(x)) if self._layer is not None else None
        return x if fn is None else fn(x)

    def expected_landing(self, delta: Float[torch.Tensor, " d_model"]) -> dict[str, float] | None:
        """What the edit predicts for the landing coordinate t along ``delta`` (the DiM mean difference),
        for symmetric clusters; None where there is no such prediction."""
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
        for name in sorted(modules | {hooked.__module__, Scope.__module__}):
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
        """
        layout, specs = bundle.layout, []
        positions = self.scope.positions
        project_writes = self.edits_writes and self.scope.layers == "all"
        spread = bundle.spans_devices
        for layer in self.layers(bundle.n_layers):
            block = layout.blocks[layer]
            where = self._placement(block, bundle)
            edit = self.residual_edit(layer, self._cast_to(where, bundle))
            if edit is not None:
                specs.append(HookSpec(block, at_positions(edit, positions), "pre", where[0] if spread else None))
            if not project_writes:
                continue
            writes: dict[tuple[torch.device, torch.dtype], TensorFn | None] = {}  # attention and MLP share one
            for writer in (layout.attn_writers[layer], layout.mlp_writers[layer]):
                where = self._placement(writer, bundle)
                if where not in writes:
                    write = self.write_edit(layer, self._cast_to(where, bundle))
                    writes[where] = None if write is None else at_positions(write, positions)
                if writes[where] is not None:
                    specs.append(HookSpec(writer, writes[where], "post"))
        return specs

    @contextmanager
    def apply(self, bundle: ModelBundle) -> Iterator[None]:
        """Hooks on, yield, hooks off (always)."""
        with hooked(self.hook_specs(bundle)):
            yield

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
