"""Keep only the fit prompts the model itself treats as its class (Arditi et al.'s ``filter_data``).

refusal_direction scores every train and val prompt with the unsteered model's refusal score and
keeps a harmful prompt when its score is > 0 (the model is more likely to refuse than not) and a
harmless one when it is < 0; the direction is then the mean difference of prompts the model really
refuses and really answers, not of everything labelled harmful. Test prompts are never filtered.
The scores are stored with the fits (per model weights, numerics and tokens), so a warm run only reads them
and a study carries the decisions its fits rest on.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from refusal.artifacts import atomic_write_json, sha256_json
from refusal.data import InstructionSplits
from refusal.metrics import refusal_score
from refusal.models.bundle import ModelBundle
from refusal.runtime.prefix import last_logits, shared_prefix

log = logging.getLogger(__name__)

#: Which splits each switch filters.
FILTERED = {"filter_train": ("harmful_train", "harmless_train"), "filter_val": ("harmful_val", "harmless_val")}
#: A class that keeps fewer prompts than this gets a warning: its mean rests on a handful of prompts.
FEW = 8


@torch.inference_mode()
def unsteered_refusal_scores(bundle: ModelBundle, rows: Sequence[Sequence[int]], batch_size: int = 32
                             ) -> Float[torch.Tensor, " n"]:
    """refusal_direction's ``get_refusal_scores`` without hooks: each prompt's first-token refusal score.

    The prompts' shared chat-template prefix runs once per batch (same logits to float tolerance).
    """
    out = []
    for start in range(0, len(rows), batch_size):
        batch = [list(r) for r in rows[start : start + batch_size]]
        prefix = shared_prefix(batch, len(bundle.post_instruction_ids))
        logits = last_logits(bundle, prefix, [r[len(prefix):] for r in batch])[:, -1]
        out.append(refusal_score(logits, bundle.refusal_token_ids).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def keeps(split: str, scores: torch.Tensor) -> torch.Tensor:
    """Arditi's rule for one split: harmful kept when score > 0, harmless when score < 0 (strict)."""
    return scores > 0 if split.startswith("harmful") else scores < 0


@dataclass(frozen=True)
class FilterRecord:
    """What the filter did: per filtered split, how many prompts it kept of how many, and the splits
    used whole because the model treats none of their prompts as their class."""

    kept: dict[str, tuple[int, int]]
    unfiltered: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {split: {"kept": k, "of": n, **({"used_whole": True} if split in self.unfiltered else {})}
                for split, (k, n) in self.kept.items()}

    def summary(self) -> str:
        return ", ".join(f"{split} {k}/{n}" + (" (none: used whole)" if split in self.unfiltered else "")
                         for split, (k, n) in self.kept.items()) or "off"


def _read_record(path: Path, key: Mapping[str, Any], n: int) -> dict[str, Any] | None:
    """A stored split's record when it is this split's (key, checksum, length), else None (a warning if it is not)."""
    try:
        saved = json.loads(path.read_text())
        kept = saved.get("kept")
        if (saved["key"] == key and saved["sha256"] == sha256_json(saved["scores"]) and len(saved["scores"]) == n
                and (kept is None or (len(kept) == n and saved.get("kept_sha256") == sha256_json(kept)))):
            return saved
        log.warning("refusal-score record %s does not match its checksum or prompts; recomputing", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("refusal-score record %s is unreadable; recomputing", path)
    return None


def _kept_mask(folders: Sequence[Path], bundle: ModelBundle, split: str, rows: list[list[int]], batch_size: int
               ) -> torch.Tensor:
    """Which of the split's prompts the filter keeps, from the first folder's stored record (checksummed JSON), else
    from a later folder's (then copied to the first), else scored and stored in the first.

    A score within rounding of 0 changes sign when scored again with bfloat16 products (qwen15's prompt 4 of
    harmful_train: kept on 2026-12-03; −0.0116 with 2 threads, +0.0014 with 1 thread, −0.0013 with 1 thread at
    batch 8, all on 2026-12-05, scores differing by up to 0.06), and with it every fit keyed by
    the kept prompts; so the scores live with the fits they decide (``artifacts_dir``, committed with a study). A
    record may carry ``kept`` (the decisions a run made, with a ``note`` saying where they come from): it is used
    instead of the scores' signs."""
    key = {"weights_hash": bundle.weights_hash, "dtype": str(bundle.dtype), **bundle.numerics_key(), "tokens": sha256_json(rows),
           "refusal_token_ids": sorted(bundle.refusal_token_ids)}
    name = f"{sha256_json(key)[:24]}.json"
    target = folders[0] / name
    for folder in folders:
        if (saved := _read_record(folder / name, key, len(rows))) is not None:
            if folder != folders[0]:
                atomic_write_json(target, saved)
            if saved.get("kept") is not None:
                log.info("refusal filter: %s decisions as recorded in %s (%s)", split, target, saved.get("note", ""))
                return torch.tensor(saved["kept"], dtype=torch.bool)
            return keeps(split, torch.tensor(saved["scores"], dtype=torch.float64))
    log.info("scoring %d %s prompts for the refusal filter", len(rows), split)
    scores = unsteered_refusal_scores(bundle, rows, batch_size)
    values = [float(s) for s in scores]
    atomic_write_json(target, {"key": key, "scores": values, "sha256": sha256_json(values)})
    return keeps(split, scores)


def filter_splits(splits: InstructionSplits, tokens: Mapping[str, list[list[int]]], bundle: ModelBundle,
                  switches: Mapping[str, bool], store: Path, batch_size: int = 32, legacy: Sequence[Path] = ()
                  ) -> tuple[InstructionSplits, FilterRecord]:
    """``splits`` with the train and/or val prompts the model does not treat as their class removed. The scores are
    stored under ``store`` (per model), read from ``legacy`` folders (per model) when ``store`` has none yet.

    A split the model treats *none* of as its class (a model that barely refuses, a base model: the
    negative controls) has no mean to take; refusal_direction would fail there. It is used whole,
    with a warning, and the record says so.
    """
    changed: dict[str, list[str]] = {}
    kept: dict[str, tuple[int, int]] = {}
    whole: list[str] = []
    for switch, names in FILTERED.items():
        if not switches.get(switch, False):
            continue
        for split in names:
            texts = getattr(splits, split)
            folders = [root / bundle.name for root in (store, *legacy)]
            mask = _kept_mask(folders, bundle, split, tokens[split], batch_size)
            rows = [t for t, k in zip(texts, mask.tolist(), strict=True) if k]
            kept[split] = (len(rows), len(texts))
            side = "refuses" if split.startswith("harmful") else "answers"
            if not rows:
                whole.append(split)
                warnings.warn(f"fit.{switch}: the model {side} none of the {len(texts)} {split} prompts by its "
                              "first-token refusal score; using all of them (fit.filter_train/filter_val=false "
                              "does this for every split)", stacklevel=2)
                continue
            if len(rows) < min(FEW, len(texts)):
                warnings.warn(f"fit.{switch}: the model {side} only {len(rows)} of {len(texts)} {split} prompts; "
                              "their mean rests on these few", stacklevel=2)
            changed[split] = rows
    record = FilterRecord(kept, tuple(whole))
    if kept:
        log.info("refusal filter (Arditi et al.): kept %s", record.summary())
    return (replace(splits, **changed) if changed else splits), record
