"""Where an intervention acts: which layers, and which token positions.

Scope is a parameter of every intervention (``intervention.layers``, ``intervention.positions``),
not a property of its class, so the study can separate a method from its reach (DiM ablation at
one layer, INLP at every layer...).

Layers: ``selected`` (the DiM layer, or ``intervention.layer``), ``all``, or a list of indices.
At each layer in scope the edit is applied to the residual stream at the block's input. With
``layers=all`` a projection (``Intervention.edits_writes``: DiM ablation, INLP nullspace, random
ablation) is also applied, without its centre, to every block's attention and MLP outputs, so no
block writes the removed component back: it is then zero everywhere in the residual stream, which
is Arditi et al.'s directional ablation (and what orthogonalized weights compute).

Positions: ``all``; ``prompt`` (the prompt's tokens, never generated ones); ``post_instruction``
(the chat-template tokens after the instruction, where DiM and INLP were fitted). The code that
runs a forward pass knows which token is which and says so with
:func:`refusal.runtime.roles.token_roles`; a hook with
a position scope reads those roles and edits only the chosen positions. A forward pass whose
length differs from the roles' (a decoding step over the KV cache) holds generated tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from refusal.errors import ConfigError

# The token roles moved to refusal.runtime.roles (generation and extraction declare them, below interventions);
# these names stay importable from here for plugins written against the old layout.
from refusal.runtime.roles import (  # noqa: F401
    GENERATED,
    INSTRUCTION,
    PAD,
    POST_INSTRUCTION,
    at_positions,
    current_mask,
    declare_roles,
    role_grid,
    token_roles,
)

LAYER_WORDS = ("selected", "all")
POSITION_WORDS = ("all", "prompt", "post_instruction")



@dataclass(frozen=True)
class Scope:
    """Validated ``intervention.layers`` / ``intervention.positions``."""

    layers: str | tuple[int, ...]
    positions: str = "all"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], default_layers: str = "selected") -> Scope:
        layers = cfg.get("layers")
        layers = default_layers if layers is None else layers
        if isinstance(layers, str):
            if layers not in LAYER_WORDS:
                raise ConfigError(f"intervention.layers={layers!r} must be one of {LAYER_WORDS} or a list of layer indices")
        elif isinstance(layers, Sequence) and layers and all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
            layers = tuple(sorted(set(layers)))
        else:
            raise ConfigError(f"intervention.layers={layers!r} must be one of {LAYER_WORDS} or a non-empty list of "
                              "layer indices, e.g. intervention.layers=[10,12]")
        positions = cfg.get("positions") or "all"
        if positions not in POSITION_WORDS:
            raise ConfigError(f"intervention.positions={positions!r} must be one of {POSITION_WORDS}")
        return cls(layers, positions)

    def check_range(self, n_layers: int | None) -> None:
        """A layer list out of range fails before the model loads (when the config declares n_layers)."""
        if n_layers is None or isinstance(self.layers, str):
            return
        bad = [v for v in self.layers if not 0 <= v < n_layers]
        if bad:
            raise ConfigError(f"intervention.layers has {bad} out of range for a model with {n_layers} layers "
                              f"(use 0..{n_layers - 1})")

    def resolve(self, n_layers: int, selected: int | None) -> list[int]:
        """The concrete layer indices."""
        if self.layers == "all":
            return list(range(n_layers))
        if self.layers == "selected":
            if selected is None:
                raise ConfigError("intervention.layers=selected needs a selected layer (a DiM fit or intervention.layer)")
            return [check_layer(selected, n_layers)]
        self.check_range(n_layers)
        return list(self.layers)

    def label(self) -> str:
        layers = self.layers if isinstance(self.layers, str) else ",".join(map(str, self.layers))
        return f"layers={layers}, positions={self.positions}"


def check_layer(layer: Any, n_layers: int | None = None) -> int | None:
    """``intervention.layer``: null (the DiM layer) or a layer index, in range once the model's size is known.
    The one check of it: the config checks, the intervention's constructor and :meth:`Scope.resolve` call it."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"intervention.layer={layer!r} must be an integer, or null for the DiM layer")
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ConfigError(f"intervention.layer={layer} is out of range for a model with {n_layers} layers "
                          f"(use 0..{n_layers - 1}, or null for the DiM layer)")
    return layer


def resolve_k(k: Any, rank: int, what: str = "intervention.k") -> int:
    """``k`` as an int (1..rank), ``all``/None (= rank) or a fraction in (0, 1] of the rank (rounded, >= 1)."""
    if k is None or k == "all":
        return rank
    if isinstance(k, bool):
        pass
    elif isinstance(k, int):
        if 1 <= k <= rank:
            return k
        raise ConfigError(f"{what}={k} must be in 1..{rank} (the fitted INLP rank), 'all', or a fraction in (0, 1]")
    elif isinstance(k, float) and math.isfinite(k) and 0 < k <= 1:
        return max(1, min(rank, round(k * rank)))
    raise ConfigError(f"{what}={k!r} must be an int >= 1, 'all', or a fraction in (0, 1] of the fitted rank")


def check_k(k: Any, cap: int | None = None) -> None:
    """The checks on ``k`` that need no fitted rank (run before the model loads)."""
    if k is None or k == "all":
        return
    if isinstance(k, int) and not isinstance(k, bool):
        if k < 1:
            raise ConfigError(f"intervention.k={k} must be >= 1 (or 'all', or a fraction in (0, 1])")
        if cap is not None and k > cap:
            raise ConfigError(f"intervention.k={k} exceeds fit.inlp.n_iterations={cap}, the most directions INLP can fit; "
                              "lower intervention.k or raise fit.inlp.n_iterations")
        return
    resolve_k(k, 1)  # fractions and anything else: same rule, rank-free
