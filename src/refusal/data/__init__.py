"""Harmful/harmless instruction data: sources, cleaning and seeded train/val/test splits.

``load_splits(cfg)`` is the one entry point; ``cfg.name`` picks a source from
:data:`DATA_SOURCES` (``embedded`` ships with the package and needs nothing else).
"""

from __future__ import annotations

from refusal.data.pools import DataWarning
from refusal.data.splits import DATA_SOURCES, InstructionSplits, load_splits

__all__ = ["DATA_SOURCES", "DataWarning", "InstructionSplits", "load_splits"]
