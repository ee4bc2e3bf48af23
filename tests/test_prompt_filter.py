"""Arditi et al.'s train/val filter: keep the prompts the model itself treats as their class."""

from __future__ import annotations

import json

import pytest
import torch
from test_selection import PLANT_LAYER, TRIGGER, planted  # noqa: F401  (the planted-refusal model fixture)

from refusal.artifacts import sha256_json
from refusal.context import prepare
from refusal.data import InstructionSplits
from refusal.fitting.prompt_filter import filter_splits, keeps, unsteered_refusal_scores
from refusal.metrics import refusal_score
from refusal.runtime.hooks import HookSpec, hooked
from refusal.runtime.prefix import forward


def test_keep_rule_is_strict_on_both_sides():
    # refusal_direction: harmful kept when score > 0, harmless when score < 0; a score of exactly 0 is dropped from both
    scores = torch.tensor([-1.0, 0.0, 1e-12, 3.0], dtype=torch.float64)
    assert keeps("harmful_train", scores).tolist() == [False, False, True, True]
    assert keeps("harmless_val", scores).tolist() == [True, False, False, False]


def test_scores_equal_one_unpadded_pass_per_prompt(tiny_bundle, prompts):
    rows = tiny_bundle.tokenize_instructions(prompts)
    got = unsteered_refusal_scores(tiny_bundle, rows, batch_size=3)  # two batches, shared prefix, padding
    with torch.inference_mode():
        one_by_one = torch.cat([refusal_score(forward(tiny_bundle, [r]).logits[:, -1].float(), tiny_bundle.refusal_token_ids)
                                for r in rows])
    torch.testing.assert_close(got, one_by_one, atol=1e-5, rtol=1e-5)


def _splits(harmful_train, harmless_train, harmful_val, harmless_val) -> InstructionSplits:
    return InstructionSplits(harmful_train, harmless_train, harmful_val, harmless_val, ["t"], ["u"], "test")


def test_planted_model_keeps_exactly_the_prompts_it_refuses(planted, tmp_path):  # noqa: F811
    bundle, unit = planted
    # the plant adds 8·r̂ to triggered prompts; shifting every prompt by −4·r̂ makes the others answer (score < 0)
    with hooked([HookSpec(bundle.layout.blocks[PLANT_LAYER], lambda x: x - 4.0 * unit, "pre")]):
        _check_planted_filter(bundle, tmp_path)


def _check_planted_filter(bundle, tmp_path) -> None:
    refused = [f"Explain topic {i}. {TRIGGER}" for i in range(4)]  # the plant makes these refuse
    labelled_only = [f"Explain subject {i}." for i in range(3)]     # labelled harmful, but the model answers
    harmless = [f"Describe place {i}." for i in range(5)]
    splits = _splits(refused[:2] + labelled_only + refused[2:], harmless, refused[:1] + labelled_only[:1], harmless[:2])
    tokens = {name: bundle.tokenize_instructions(rows) for name, rows in splits.lists().items()}
    scores = unsteered_refusal_scores(bundle, tokens["harmful_train"])
    assert (scores[[0, 1, 5, 6]] > 0).all() and (scores[2:5] < 0).all()  # the plant works as intended

    out, record = filter_splits(splits, tokens, bundle, {"filter_train": True, "filter_val": True}, tmp_path)
    assert out.harmful_train == refused and out.harmful_val == refused[:1]
    assert out.harmless_train == harmless and out.harmless_val == harmless[:2]  # the model answers every one
    assert record.as_dict()["harmful_train"] == {"kept": 4, "of": 7}
    assert record.as_dict()["harmful_val"] == {"kept": 1, "of": 2}
    assert out.harmful_test == splits.harmful_test  # test prompts are never filtered

    only_val, record = filter_splits(splits, tokens, bundle, {"filter_train": False, "filter_val": True}, tmp_path)
    assert only_val.harmful_train == splits.harmful_train and set(record.kept) == {"harmful_val", "harmless_val"}


def test_a_class_with_nothing_kept_is_used_whole_and_says_so(tiny_bundle, prompts, tmp_path):
    # the tiny random model puts almost no mass on its refusal tokens: it "refuses" nothing
    splits = _splits(prompts, prompts[:2], prompts[:3], prompts[:2])
    tokens = {name: tiny_bundle.tokenize_instructions(rows) for name, rows in splits.lists().items()}
    with pytest.warns(UserWarning, match="refuses none of the 4 harmful_train prompts"):
        out, record = filter_splits(splits, tokens, tiny_bundle, {"filter_train": True}, tmp_path)
    assert out.harmful_train == prompts and record.as_dict()["harmful_train"] == {"kept": 0, "of": 4, "used_whole": True}


def test_scores_are_cached_checksummed_and_recomputed_when_tampered(tiny_bundle, prompts, tmp_path):
    splits = _splits(prompts, prompts[:2], prompts[:3], prompts[:2])
    tokens = {name: tiny_bundle.tokenize_instructions(rows) for name, rows in splits.lists().items()}
    with pytest.warns(UserWarning):
        filter_splits(splits, tokens, tiny_bundle, {"filter_train": True}, tmp_path)
    files = sorted((tmp_path / tiny_bundle.name).glob("*.json"))
    assert len(files) == 2  # harmful_train and harmless_train
    saved = json.loads(files[0].read_text())
    saved["scores"][0] = 99.0  # would flip a harmful prompt to "kept" if trusted
    files[0].write_text(json.dumps(saved))
    with pytest.warns(UserWarning):
        _, record = filter_splits(splits, tokens, tiny_bundle, {"filter_train": True}, tmp_path)
    assert json.loads(files[0].read_text())["scores"][0] != 99.0  # recomputed, not trusted
    assert record.as_dict()["harmful_train"]["kept"] == 0


def test_run_records_the_filter_and_keys_artifacts_by_the_kept_prompts(compose):
    with pytest.warns(UserWarning, match="refuses none"):  # the tiny model refuses nothing: harmful used whole
        on = prepare(compose("fit.filter_train=true", "fit.filter_val=true"))
    off = prepare(compose("fit.filter_train=false", "fit.filter_val=false"))
    assert set(on.filtered.kept) == {"harmful_train", "harmless_train", "harmful_val", "harmless_val"}
    assert set(on.filtered.unfiltered) == {"harmful_train", "harmful_val"} and off.filtered.kept == {}
    for name, (kept, of) in on.filtered.kept.items():
        assert of == len(getattr(off.splits, name))
        assert len(getattr(on.splits, name)) == (of if name in on.filtered.unfiltered else kept)
    # the folder is keyed by the prompts the fits use; the tokens are the kept prompts'
    assert on.artifact_dir.name.endswith(on.splits.fit_digest()[:10])
    assert on.tokens("harmless_train") == on.bundle.tokenize_instructions(on.splits.harmless_train)


def test_scores_live_with_the_fits_and_older_caches_are_read_not_rescored(tiny_bundle, prompts, tmp_path, caplog):
    """A record in a legacy folder (the old cache_dir/refusal_scores) is used and copied beside the fits; a record's
    ``kept`` (decisions a run made, e.g. recovered from its committed fits) wins over its scores' signs, and a
    tampered ``kept`` is not trusted."""
    splits = _splits(prompts, prompts[:2], prompts[:3], prompts[:2])
    tokens = {name: tiny_bundle.tokenize_instructions(rows) for name, rows in splits.lists().items()}
    legacy, store = tmp_path / "cache", tmp_path / "artifacts"
    with pytest.warns(UserWarning):
        filter_splits(splits, tokens, tiny_bundle, {"filter_train": True}, legacy)
    caplog.set_level("INFO", logger="refusal.fitting.prompt_filter")
    with pytest.warns(UserWarning):
        filter_splits(splits, tokens, tiny_bundle, {"filter_train": True}, store, legacy=[legacy])
    assert "scoring" not in caplog.text  # read, not scored again
    copied = sorted((store / tiny_bundle.name).glob("*.json"))
    assert [p.read_text() for p in copied] == [p.read_text() for p in sorted((legacy / tiny_bundle.name).glob("*.json"))]
    harmful = next(p for p in copied if len(json.loads(p.read_text())["scores"]) == len(prompts))
    saved = json.loads(harmful.read_text())
    kept = [True, False, True, False]  # the tiny model refuses none by its scores; the record says otherwise
    harmful.write_text(json.dumps({**saved, "kept": kept, "kept_sha256": sha256_json(kept), "note": "recovered"}))
    out, record = filter_splits(splits, tokens, tiny_bundle, {"filter_train": True}, store)
    assert out.harmful_train == [prompts[0], prompts[2]] and record.as_dict()["harmful_train"] == {"kept": 2, "of": 4}
    harmful.write_text(json.dumps({**saved, "kept": [True] * 4, "kept_sha256": sha256_json(kept)}))
    with pytest.warns(UserWarning, match="refuses none"):  # the tampered decisions are dropped: scored again
        out, _ = filter_splits(splits, tokens, tiny_bundle, {"filter_train": True}, store)
    assert out.harmful_train == prompts
