"""The process-wide model holder that lets a multirun's jobs share one loaded model."""

from __future__ import annotations

import pytest
import torch

from refusal.models.held import held_model, hook_count, loads_in_process, release_model
from refusal.runtime.hooks import HookSpec, hooked

TINY = {"name": "tiny", "source": "tiny", "tiny": {"n_layers": 3, "seed": 5}}


@pytest.fixture(autouse=True)
def _empty_holder():
    release_model()
    yield
    release_model()


def _logits(bundle) -> torch.Tensor:
    ids = torch.tensor([bundle.tokenize_instructions(["Name three rivers."])[0]])
    with torch.inference_mode():
        return bundle.model(input_ids=ids).logits


def test_same_config_is_reused_and_another_replaces_it(tmp_path):
    before = loads_in_process()
    first, reused = held_model(TINY, tmp_path)
    again, reused_again = held_model(dict(TINY), tmp_path)
    assert (reused, reused_again) == (False, True) and again is first
    other, reused_other = held_model({**TINY, "tiny": {"n_layers": 3, "seed": 6}}, tmp_path)
    assert not reused_other and other is not first
    assert loads_in_process() == before + 2


def test_hooks_are_off_between_jobs_and_a_leftover_hook_forces_a_reload(tmp_path):
    bundle, _ = held_model(TINY, tmp_path)
    clean = _logits(bundle)
    with hooked([HookSpec(bundle.layout.blocks[1], lambda x: x * 0.0, "pre")]):
        assert not torch.equal(_logits(bundle), clean)
    assert hook_count(bundle.model) == 0
    reused, was_reused = held_model(TINY, tmp_path)
    assert was_reused and torch.equal(_logits(reused), clean)
    bundle.layout.blocks[1].register_forward_pre_hook(lambda module, args: None)  # a plugin that never cleans up
    fresh, was_reused = held_model(TINY, tmp_path)
    assert not was_reused and fresh is not bundle and hook_count(fresh.model) == 0
    assert torch.equal(_logits(fresh), clean)
