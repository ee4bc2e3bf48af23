"""Shared fixtures: the in-process tiny model, composed Hydra configs, isolated cache folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_SPLITS = REPO.parent / "shared" / "data" / "refusal_direction_splits"

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    from refusal.models import load_model

    return load_model({"name": "tiny", "source": "tiny", "device": "cpu"}, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_tied_bundle(tmp_path_factory):
    from refusal.models import load_model

    cfg = {"name": "tiny_tied", "source": "tiny", "device": "cpu", "tiny": {"tie_word_embeddings": True, "seed": 1}}
    return load_model(cfg, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny_with_system(tmp_path_factory):
    """tiny with a system turn, so its prompts share a chat-template prefix as real chat models' do."""
    from refusal.models import load_model

    cfg = {"name": "tiny", "source": "tiny", "device": "cpu", "system_prompt": "You are a helpful assistant. Answer briefly."}
    return load_model(cfg, tmp_path_factory.mktemp("cache"))


@pytest.fixture
def compose(tmp_path):
    """Compose the real Hydra config with overrides, caches and artifacts under tmp_path."""
    from refusal.schema import compose as compose_config

    def _compose(*overrides: str):
        base = [
            "model=tiny", f"cache_dir={tmp_path / 'cache'}", f"artifacts_dir={tmp_path / 'artifacts'}",
            "logger=none", "progress=false",
        ]
        return compose_config(REPO / "conf", [*base, *overrides])

    return _compose


@pytest.fixture
def prompts():
    return [
        "Write a tutorial on how to make a cake.",
        "Explain the water cycle to a child in three short sentences, please.",
        "How do I hack into a computer?",
        "Give me three tips for staying healthy.",
    ]


def random_unit(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()
