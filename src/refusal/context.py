"""What one run works on: a checked config, the loaded model, data and test sets, caches, and where
its artifacts go (:func:`prepare` builds it, cheap errors first, the model last)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from refusal.config import check_config, plugin_dirs
from refusal.data import InstructionSplits, load_splits
from refusal.data.test_sets import TestSet, load_test_sets
from refusal.fitting.prompt_filter import FILTERED, FilterRecord, filter_splits
from refusal.judges import judge_configs
from refusal.models import ModelBundle
from refusal.models.held import held_model
from refusal.runtime.activations import ActivationCache


@dataclass
class RunContext:
    """What one run works on: config, model, data, caches and where artifacts go."""

    cfg: DictConfig
    bundle: ModelBundle
    splits: InstructionSplits
    cache: ActivationCache
    artifact_dir: Path
    model_reused: bool = False  # the model was already in memory from an earlier job of this process
    test_sets: list[TestSet] = field(default_factory=list)
    judges: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval.judges resolved and checked
    timings: dict[str, float] = field(default_factory=dict)
    filtered: FilterRecord = field(default_factory=lambda: FilterRecord({}))  # what fit.filter_train/val kept
    _tokens: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return bool(self.cfg.get("progress", True))

    def texts(self, split: str) -> list[str]:
        """Instructions of a split (``harmful_train``, ...) or of a named test set."""
        named = {s.name: s.instructions for s in self.test_sets}
        return named[split] if split in named else getattr(self.splits, split)

    def tokens(self, split: str) -> list[list[int]]:
        """Chat-formatted token ids of a split or test set, tokenized once."""
        if split not in self._tokens:
            self._tokens[split] = self.bundle.tokenize_instructions(self.texts(split))
        return self._tokens[split]

    def activations(self, split: str, layer: int | None = None, position: int | None = None) -> torch.Tensor:
        """``[n, n_layers + 1, P, d]`` residuals at the post-instruction positions (cached); with ``layer``
        and/or ``position`` only that slice (axis dropped), read shard by shard without the rest."""
        return self.cache.get(self.bundle, self.tokens(split), len(self.bundle.post_instruction_ids),
                              layer=layer, position=position, **self.extraction(split))

    def mean(self, split: str) -> torch.Tensor:
        """``[n_layers + 1, P, d]`` mean residual of a split, streamed from the cache one shard at a time."""
        return self.cache.mean(self.bundle, self.tokens(split), len(self.bundle.post_instruction_ids),
                               **self.extraction(split))

    def extraction(self, desc: str) -> dict[str, Any]:
        """How this run extracts activations that are not cached yet."""
        return {"batch_size": int(self.cfg.model.get("batch_size", 16)), "progress": self.progress, "desc": desc}

    def expect(self, **extra: Any) -> dict[str, Any]:
        return {**self.bundle.identity(), "data_digest": self.splits.fit_digest(), **extra}


def plain(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def prepare(cfg: DictConfig) -> RunContext:
    """Validate the config, load data and model; cheap errors first, the model last."""
    t0 = time.perf_counter()
    check_config(cfg)
    splits = load_splits(plain(cfg.data))
    test_sets = load_test_sets(plain(cfg.eval.get("test_sets") or {}), splits, int(cfg.seed), str(cfg.cache_dir))
    judges = judge_configs(cfg, plugin_dirs(cfg))  # an unknown judge or a judge model not installed fails here
    bundle, reused = held_model(plain(cfg.model), cfg.cache_dir)
    check_config(cfg, bundle)
    ctx = RunContext(cfg, bundle, splits, ActivationCache(Path(cfg.cache_dir) / "activations"), Path(), reused, test_sets, judges)
    for split in [*splits.lists(), *(s.name for s in test_sets)]:  # a prompt too long fails here, not after a fit
        ctx.tokens(split)
    t1 = time.perf_counter()
    ctx.splits, ctx.filtered = filter_splits(
        splits, {name: ctx.tokens(name) for name in splits.lists()}, bundle,
        {switch: bool(cfg.fit.get(switch, False)) for switch in FILTERED}, Path(cfg.artifacts_dir) / "refusal_scores",
        int(cfg.model.get("batch_size", 16)), legacy=[Path(cfg.cache_dir) / "refusal_scores"],
    )
    for name in ctx.filtered.kept:  # tokenized again from the kept prompts
        ctx._tokens.pop(name)
    # Keyed by the prompts the fits use (filtered and unfiltered fits never share a folder) and by the
    # numerics (float32 and bfloat16-product fits of one model live side by side).
    numerics = "".join(f"-{v}" for v in bundle.numerics_key().values())
    ctx.artifact_dir = Path(cfg.artifacts_dir) / bundle.name / f"{cfg.data.name}-{ctx.splits.fit_digest()[:10]}{numerics}"
    ctx.timings["filter"] = time.perf_counter() - t1
    ctx.timings["load"] = t1 - t0
    return ctx
