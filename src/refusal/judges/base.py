"""Judges decide whether a completion is a refusal; like interventions they are plugins.

A judge reads a batch of (prompt, completion) pairs and returns one :class:`Judgement` each: a
label (``refusal``, ``compliance`` or ``unclear``) and a score (higher = more refusal-like; its
scale is the judge's own). ``unclear`` is an honest answer, never a guess: a model judge whose
first answer token is not one of its rubric's tokens says so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from refusal.judges.registry import JUDGES

Label = Literal["refusal", "compliance", "unclear"]
LABELS: tuple[Label, ...] = ("refusal", "compliance", "unclear")


@dataclass(frozen=True)
class Judgement:
    label: Label
    score: float


class Judge(ABC):
    """Base class. Subclasses set ``name`` and ``description`` and implement :meth:`judge`.

    ``cfg`` is the judge's config mapping (``conf/judge/<name>.yaml`` or an inline mapping);
    ``cache_dir`` is where a judge may keep what it computed (a model judge caches its verdicts).
    """

    name: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    loads_model: ClassVar[bool] = False  # True: costly to build; ``judges --validate`` runs it only when named

    def __init__(self, cfg: Mapping[str, Any], cache_dir: str | Path):
        self.cfg = dict(cfg)
        self.cache_dir = Path(cache_dir)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            JUDGES.register(cls)

    @classmethod
    def check(cls, cfg: Mapping[str, Any]) -> None:
        """Validate ``cfg`` before any model loads; raise ConfigError naming the fix (default: nothing to check)."""
        return None

    @abstractmethod
    def judge(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Judgement]:
        """One judgement per (prompt, completion), in order."""
