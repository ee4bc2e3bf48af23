"""Turn a data config into seeded, disjoint train/val/test splits of harmful and harmless prompts.

All sources share these rules so a direction fitted on one source is evaluated the same way on
another: strip and drop blanks, remove duplicates (warned), keep an instruction that sits in
both classes out of every split (its label is ambiguous), keep rows a source holds out for
validation out of train, and sample with ``random.Random`` so the same config always yields
the same splits, whose :meth:`InstructionSplits.digest` then keys activation caches.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from refusal.artifacts import sha256_json
from refusal.data.pools import DataWarning, Pool
from refusal.data.sources import LOADERS
from refusal.errors import DataError

DATA_SOURCES: tuple[str, ...] = ("embedded", "refusal_direction", "hf", "files")
SIZE_KEYS = ("n_train", "n_val", "n_test")
LABELS = ("harmful", "harmless")
assert set(DATA_SOURCES) == set(LOADERS)


@dataclass(frozen=True)
class InstructionSplits:
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    harmful_test: list[str]
    harmless_test: list[str]
    source: str  # human description, e.g. "embedded" or "refusal_direction:/path"

    def lists(self) -> dict[str, list[str]]:
        """The six instruction lists by field name (everything but ``source``)."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if f.name != "source"}

    def digest(self) -> str:
        """SHA-256 of the content only, so moving a data folder does not invalidate caches."""
        return sha256_json(self.lists())

    def fit_digest(self) -> str:
        """SHA-256 of the train and val lists: what fitted artifacts depend on (never the test prompts,
        so evaluating on more or other test prompts reuses the fits)."""
        return sha256_json({k: v for k, v in self.lists().items() if not k.endswith("_test")})

    def sizes(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.lists().items()}


@dataclass(frozen=True)
class _CleanPool:
    train: list[str]
    held_out: list[str]
    train_only: frozenset[str]  # rows also in held_out: used for train, never for val/test


def load_splits(cfg: Mapping[str, Any]) -> InstructionSplits:
    """Load the configured source and sample per-class train/val/test splits.

    ``cfg`` keys: ``name`` (one of :data:`DATA_SOURCES`), ``seed``, ``n_train``/``n_val``/``n_test``
    (per class; at most one ``null``, which takes what is left) plus the source's own keys.
    """
    if not isinstance(cfg, Mapping):
        raise DataError(
            f"data config must be a mapping, got {type(cfg).__name__}; pass the `data` config group"
        )
    name = cfg.get("name")
    if name not in DATA_SOURCES:
        what = "is missing" if name is None else f"is {name!r}"
        raise DataError(f"data.name {what}; set data.name (or data=...) to one of {list(DATA_SOURCES)}")
    seed = cfg.get("seed", 0)
    requested = _requested_sizes(cfg)
    raw = LOADERS[name](cfg)
    pools = _clean(raw.harmful, raw.harmless)
    out: dict[str, list[str]] = {}
    for label in LABELS:
        # One generator per class (string seeds hash deterministically), so harmful splits do
        # not shift when only the harmless rows change.
        rng = random.Random(f"{seed}:{label}")
        sizes = _resolve_sizes(label, pools[label], requested)
        out[f"{label}_train"], out[f"{label}_val"], out[f"{label}_test"] = _sample(pools[label], sizes, rng)
    return InstructionSplits(source=raw.source, **out)


def _requested_sizes(cfg: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """The three split sizes (each a positive integer or null: the schema, :class:`refusal.schema.DataSchema`);
    at most one may be null."""
    values = [cfg.get(key) for key in SIZE_KEYS]
    nulls = [f"data.{k}" for k, v in zip(SIZE_KEYS, values, strict=True) if v is None]
    if len(nulls) > 1:
        raise DataError(
            f"{' and '.join(nulls)} are null (or missing); at most one split size may be null, since null "
            "means 'all that is left after the other splits': set the others to positive integers"
        )
    return values[0], values[1], values[2]


def _unique(rows: list[str]) -> list[str]:
    """First occurrence of each row, order kept (dicts preserve insertion order)."""
    return list(dict.fromkeys(rows))


def _clean(harmful: Pool, harmless: Pool) -> dict[str, _CleanPool]:
    """De-duplicate within each class and drop instructions that appear in both classes."""
    pools: dict[str, _CleanPool] = {}
    for label, pool in zip(LABELS, (harmful, harmless), strict=True):
        stripped_train = [r.strip() for r in pool.train if r and r.strip()]
        stripped_held = [r.strip() for r in pool.held_out if r and r.strip()]
        train, held = _unique(stripped_train), _unique(stripped_held)
        dups = len(stripped_train) - len(train) + len(stripped_held) - len(held)
        if dups:
            warnings.warn(
                f"{label}: removed {dups} duplicate instruction(s), keeping the first of each",
                DataWarning,
                stacklevel=3,
            )
        in_train = set(train)
        both = [row for row in held if row in in_train]
        if both:
            warnings.warn(
                f"{label}: {len(both)} instruction(s) appear in both the train and the held-out (val) rows; "
                "they are used for train only and kept out of val/test",
                DataWarning,
                stacklevel=3,
            )
        pools[label] = _CleanPool(
            train=train, held_out=[row for row in held if row not in in_train], train_only=frozenset(both)
        )

    def everything(pool: _CleanPool) -> set[str]:
        return set(pool.train) | set(pool.held_out)

    shared = everything(pools["harmful"]) & everything(pools["harmless"])
    if shared:
        example = sorted(shared)[0]
        warnings.warn(
            f"{len(shared)} instruction(s) appear as both harmful and harmless (e.g. {example!r:.80}); "
            "their label is ambiguous, so they are left out of every split",
            DataWarning,
            stacklevel=3,
        )
        pools = {
            label: _CleanPool(
                train=[r for r in p.train if r not in shared],
                held_out=[r for r in p.held_out if r not in shared],
                train_only=p.train_only - shared,
            )
            for label, p in pools.items()
        }
    for label, pool in pools.items():
        if not pool.train and not pool.held_out:
            raise DataError(f"no {label} instructions left after cleaning; give the source some {label} rows")
    return pools


def _resolve_sizes(
    label: str, pool: _CleanPool, requested: tuple[int | None, int | None, int | None]
) -> tuple[int, int, int]:
    """Fill the (single) null size and check that the request fits this class's rows."""
    n_train, n_val, n_test = requested
    n_tr, n_held, n_only = len(pool.train), len(pool.held_out), len(pool.train_only)

    def fail(detail: str) -> DataError:
        asked = ", ".join(
            f"data.{k}={'null' if v is None else v}" for k, v in zip(SIZE_KEYS, requested, strict=True)
        )
        held = f" + {n_held} held-out rows usable for val/test only" if n_held else ""
        return DataError(
            f"{label}: {detail} ({asked}); {n_tr} {label} instructions are available for train{held}; "
            "lower data.n_train/data.n_val/data.n_test, or set one of them to null to take what is left"
        )

    if n_train is None:
        assert n_val is not None and n_test is not None
        n_train = n_tr - max(0, n_val + n_test - n_held)
        if n_train <= 0:
            raise fail("nothing is left for train")
    if n_train > n_tr:
        raise fail(f"train asks for {n_train} but only {n_tr} rows can be used for train")
    for_eval = n_held + n_tr - max(n_train, n_only)
    if n_val is None:
        assert n_test is not None
        n_val = for_eval - n_test
        if n_val <= 0:
            raise fail("nothing is left for val")
    if n_test is None:
        n_test = for_eval - n_val
        if n_test <= 0:
            raise fail("nothing is left for test")
    if n_val + n_test > for_eval:
        raise fail(f"val + test ask for {n_val + n_test} but only {for_eval} rows are left after train")
    return n_train, n_val, n_test


def _sample(
    pool: _CleanPool, sizes: tuple[int, int, int], rng: random.Random
) -> tuple[list[str], list[str], list[str]]:
    """Train from ``pool.train``; val then test from held-out rows first, then unused train rows."""
    n_train, n_val, n_test = sizes
    first = [r for r in pool.train if r in pool.train_only]  # must not reach val/test: prefer for train
    rest = [r for r in pool.train if r not in pool.train_only]
    rng.shuffle(first)
    rng.shuffle(rest)
    order = first + rest
    train = order[:n_train]
    rng.shuffle(train)
    held = list(pool.held_out)
    rng.shuffle(held)
    candidates = held + [r for r in order[n_train:] if r not in pool.train_only]
    return train, candidates[:n_val], candidates[n_val : n_val + n_test]
