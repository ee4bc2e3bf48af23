"""Named test sets beside the main split: held-out benchmarks and the over-refusal set.

Directions are fitted on ``data`` (train/val) only; a test set just adds prompts to evaluate, each
with a label (``harmful``: refusal is the safe behaviour; ``harmless``: refusal is over-refusal).
A test set row that also occurs in the fit data's train or val lists (after case and whitespace), or
nearly does (:mod:`refusal.data.overlap`, ``near_duplicate``: 0.9 by default, null for exact copies
only), is dropped with a warning that says how many, so a benchmark is never silently scored on
training prompts.

    eval.test_sets:
      overrefusal: {source: embedded, file: overrefusal, label: harmless, n: 16}
      harmbench: {source: pypi, benchmark: harmbench, n: 64}   # public benchmarks: refusal.data.benchmarks
      mine: {source: file, path: hb.txt, label: harmful, n: 64}
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from refusal.data.benchmarks import benchmark, load_benchmark
from refusal.data.hub import load_hf_column
from refusal.data.overlap import DEFAULT_THRESHOLD, near_duplicates
from refusal.data.pools import DataWarning
from refusal.data.readers import read_instructions, resolve_path
from refusal.data.sources import EMBEDDED_FILES, read_embedded
from refusal.data.splits import InstructionSplits
from refusal.errors import DataError
from refusal.metrics.refusal_rate import normalize_text

SET_SOURCES = ("embedded", "file", "refusal_direction", "hf", "pypi")
SET_LABELS = ("harmful", "harmless")
RESERVED = {"harmful", "harmless", "baseline", "judges", "geometry"}


@dataclass(frozen=True)
class TestSet:
    name: str
    label: str
    instructions: list[str]
    source: str
    dropped_overlap: int  # rows equal to a fit row after case and whitespace
    dropped_near: int = 0  # near-duplicates of a fit row (refusal.data.overlap)


def _read(name: str, cfg: Mapping[str, Any], cache_dir: str | None) -> tuple[list[str], str]:
    key = f"eval.test_sets.{name}"
    source = cfg.get("source")
    if source not in SET_SOURCES:
        raise DataError(f"{key}.source={source!r}: choose one of {', '.join(SET_SOURCES)}")
    if source == "embedded":
        which = cfg.get("file", cfg.get("label"))
        if which not in EMBEDDED_FILES:
            raise DataError(f"{key}.file={which!r}: the embedded sets are {', '.join(EMBEDDED_FILES)}")
        return read_embedded(which), f"embedded/{which}"
    if source == "file":
        path = resolve_path(str(cfg.get("path") or ""), f"{key}.path")
        column = str(cfg.get("column", "instruction"))
        return read_instructions(path, column, key=f"{key}.path", column_key=f"{key}.column"), f"file:{path}"
    if source == "refusal_direction":  # the val file of the label: Arditi et al.'s evaluation prompts
        folder = resolve_path(str(cfg.get("dir") or ""), f"{key}.dir", want_dir=True)
        path = folder / f"{cfg.get('label')}_val.json"
        return read_instructions(resolve_path(str(path), f"{key}.dir"), "instruction", key=f"{key}.dir"), f"refusal_direction:{path}"
    if source == "pypi":
        return load_benchmark(cfg, key, cache_dir)

    return load_hf_column(cfg, key)


def _near_threshold(cfg: Mapping[str, Any], key: str) -> float | None:
    value = cfg.get("near_duplicate", DEFAULT_THRESHOLD)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
        raise DataError(f"{key}.near_duplicate={value!r} must be a share of words in (0, 1] (default "
                        f"{DEFAULT_THRESHOLD}), or null to drop exact copies of fit rows only")
    return value


def load_test_sets(sets: Mapping[str, Mapping[str, Any]] | None, splits: InstructionSplits, seed: int,
                   cache_dir: str | None = None) -> list[TestSet]:
    """Read, sample and de-overlap every configured set; errors name the set and the fix.

    ``cache_dir``: where ``source: pypi`` benchmarks are kept (default $REFUSAL_CACHE or ~/.cache/refusal)."""
    fit_list = [t for k, rows in splits.lists().items() if not k.endswith("_test") for t in rows]
    fit_rows = {normalize_text(t) for t in fit_list}
    out = []
    for name, cfg in (sets or {}).items():
        if cfg is None:  # eval.test_sets.<name>=null switches a default set off
            continue
        key = f"eval.test_sets.{name}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in RESERVED:
            raise DataError(f"test set name {name!r} must be lower-case letters, digits and _ and not one of "
                            f"{sorted(RESERVED)}; rename it")
        if cfg.get("source") == "pypi" and "label" not in cfg:  # the benchmark's own: harmful, or harmless
            cfg = {**cfg, "label": benchmark(cfg.get("benchmark"), f"{key}.benchmark").label}
        if cfg.get("label") not in SET_LABELS:
            raise DataError(f"{key}.label={cfg.get('label')!r}: say whether the set is harmful or harmless")
        n = cfg.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise DataError(f"{key}.n={n!r} must be a positive integer, or null for every row")
        threshold = _near_threshold(cfg, key)
        rows, origin = _read(name, cfg, cache_dir)
        rows = list(dict.fromkeys(rows))
        if not rows:
            raise DataError(f"test set {name} ({origin}) has no rows; point {key} at a non-empty source")
        unique = [r for r in rows if normalize_text(r) not in fit_rows]
        near = near_duplicates(unique, fit_list, threshold) if threshold is not None else [False] * len(unique)
        kept = [r for r, dup in zip(unique, near, strict=True) if not dup]
        if not kept:
            raise DataError(f"test set {name}: all {len(rows)} rows also occur in the fit data's train/val (or nearly: "
                            f"{key}.near_duplicate); use a held-out set, or fit on other data")
        if len(kept) < len(rows):
            warnings.warn(f"test set {name}: dropped {len(rows) - len(kept)} of {len(rows)} rows that occur in the fit "
                          f"data's train/val ({len(rows) - len(unique)} copies, {sum(near)} near-duplicates; "
                          "never tested on fit prompts)", DataWarning, stacklevel=2)
        random.Random(f"{seed}:{name}").shuffle(kept)
        out.append(TestSet(name, str(cfg["label"]), kept[:n] if n else kept, origin, len(rows) - len(unique), sum(near)))
    return out
