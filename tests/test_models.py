"""Model loading, chat formatting, post-instruction tokens, activation extraction and its cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal.artifacts import artifact_paths
from refusal.errors import ConfigError, DataError, ModelSourceError
from refusal.models import ChatFormat, load_model
from refusal.models.tiny import build_tiny_tokenizer
from refusal.runtime.activations import ActivationCache, extract_activations


def test_tiny_reports_its_shape(tiny_bundle):
    assert tiny_bundle.n_layers == 4 and tiny_bundle.d_model == 64
    assert len(tiny_bundle.layout.blocks) == 4
    assert tiny_bundle.refusal_token_ids  # "I" and "As" exist in the vocabulary
    assert tiny_bundle.tokenizer.padding_side == "left"


def test_tiny_is_deterministic(tmp_path):
    a = load_model({"name": "tiny", "source": "tiny"}, tmp_path)
    b = load_model({"name": "tiny", "source": "tiny"}, tmp_path)
    c = load_model({"name": "tiny", "source": "tiny", "tiny": {"seed": 5}}, tmp_path)
    assert a.weights_hash == b.weights_hash != c.weights_hash


def test_local_checkpoint_round_trip(tiny_bundle, tmp_path, prompts):
    folder = tmp_path / "ckpt"
    tiny_bundle.model.save_pretrained(folder)
    tiny_bundle.tokenizer.save_pretrained(folder)
    local = load_model({"name": "local", "source": "local", "path": str(folder), "device": "cpu"}, tmp_path)
    assert local.layout.model_type == "llama"
    ids = tiny_bundle.tokenize_instructions(prompts)
    assert local.tokenize_instructions(prompts) == ids
    batch = tiny_bundle.pad(ids)
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    torch.testing.assert_close(local.model(**kwargs).logits, tiny_bundle.model(**kwargs).logits, rtol=0, atol=1e-6)
    assert len(local.weights_hash) == 64
    # transformers 5 defaults to swapping layers for Hub kernels (fetched code, on a GPU): never in our loads
    assert local.model.use_kernels is False
    assert load_model({"name": "local", "source": "local", "path": str(folder)}, tmp_path).weights_hash == local.weights_hash


def test_local_path_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json"):
        load_model({"name": "local", "source": "local", "path": str(tmp_path)}, tmp_path)


def test_unknown_source_names_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="gguf_package"):
        load_model({"name": "x", "source": "ftp"}, tmp_path)


def test_offline_hub_fails_fast_and_names_packaged_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("refusal.models.loader.hub_reachable", lambda *a, **k: False)
    with pytest.raises(ModelSourceError, match="qwen05"):
        load_model({"name": "qwen", "source": "hub", "hub_id": "Qwen/Qwen2.5-1.5B-Instruct"}, tmp_path)


@pytest.mark.parametrize(
    "template, suffix",
    [
        ("chatml", "<|im_end|>\n<|im_start|>assistant\n"),  # qwen2 / SmolLM2 family
        ("llama2", " [/INST]"),
        ("gemma", "<end_of_turn>\n<start_of_turn>model\n"),
        ("llama3", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ],
)
def test_post_instruction_tokens_per_template(template, suffix):
    tok = build_tiny_tokenizer()
    chat = ChatFormat(tok, template=template)
    assert chat.post_instruction_text == suffix
    text = chat.format(["Tell me a joke."])[0]
    assert "Tell me a joke." in text and text.endswith(suffix)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[-len(chat.post_instruction_ids):] == chat.post_instruction_ids


def test_missing_template_is_a_clear_error():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ConfigError, match="chat_template"):
        ChatFormat(tok).format(["hi"])


def test_left_padding_and_positions(tiny_bundle):
    batch = tiny_bundle.pad([[5, 6, 7], [8]])
    assert batch.input_ids.tolist() == [[5, 6, 7], [tiny_bundle.pad_token_id] * 2 + [8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_extraction_matches_output_hidden_states(tiny_bundle, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    n_pos = len(tiny_bundle.post_instruction_ids)
    acts = extract_activations(tiny_bundle, ids, n_pos, batch_size=2, progress=False)
    assert acts.shape == (len(prompts), tiny_bundle.n_layers + 1, n_pos, tiny_bundle.d_model)
    for i, row in enumerate(ids):
        out = tiny_bundle.model(input_ids=torch.tensor([row]), output_hidden_states=True)
        for layer in range(tiny_bundle.n_layers):  # hidden_states[l] is the input of block l
            torch.testing.assert_close(acts[i, layer], out.hidden_states[layer][0, -n_pos:], rtol=0, atol=1e-5)
        # the last site is the final residual before the final norm
        torch.testing.assert_close(tiny_bundle.layout.final_norm(acts[i, -1]), out.hidden_states[-1][0, -n_pos:],
                                   rtol=0, atol=1e-5)


def test_padding_invariance(tiny_bundle, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts)
    n_pos = len(tiny_bundle.post_instruction_ids)
    together = extract_activations(tiny_bundle, ids, n_pos, batch_size=len(ids), progress=False)
    for i, row in enumerate(ids):
        alone = extract_activations(tiny_bundle, [row], n_pos, batch_size=1, progress=False)
        assert (alone[0] - together[i]).abs().max() < 1e-5


def test_prompt_longer_than_context_is_rejected(tiny_bundle):
    with pytest.raises(DataError, match="context"):
        tiny_bundle.tokenize_instructions(["word " * 600])


def test_cache_hit_miss_and_corruption(tiny_bundle, prompts, tmp_path, monkeypatch):
    cache = ActivationCache(tmp_path, shard_size=3)
    ids = tiny_bundle.tokenize_instructions(prompts)
    n_pos = len(tiny_bundle.post_instruction_ids)
    calls = []
    import refusal.runtime.activations as activations

    real = activations.extract_activations
    monkeypatch.setattr(activations, "extract_activations", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    first = cache.get(tiny_bundle, ids, n_pos, progress=False)
    assert calls == [3, 1]  # two shards computed
    second = cache.get(tiny_bundle, ids, n_pos, progress=False)
    assert calls == [3, 1] and torch.equal(first, second)  # full hit: the model is not run
    folder = tmp_path / "tiny" / cache.key(tiny_bundle, ids, n_pos)
    tensor_file, _ = artifact_paths(folder / "shard00001")
    tensor_file.write_bytes(tensor_file.read_bytes()[:-7])  # truncate one shard
    with pytest.warns(UserWarning, match="checksum"):
        third = cache.get(tiny_bundle, ids, n_pos, progress=False)
    assert calls == [3, 1, 1]  # only the corrupt shard recomputed
    assert torch.equal(first, third)
    other = cache.get(tiny_bundle, ids[:2], n_pos, progress=False)  # other prompts -> other key
    assert calls[-1] == 2 and torch.equal(other, first[:2])


# -- streaming reads: slices and means one shard at a time -------------------------------------------
def _two_classes(tiny_bundle, prompts):
    ids = tiny_bundle.tokenize_instructions(prompts + [p.upper() for p in prompts])
    return ids[:5], ids[5:], len(tiny_bundle.post_instruction_ids)


def test_slices_and_means_equal_the_full_tensor(tiny_bundle, prompts, tmp_path):
    from refusal.fitting.dim import dim_candidates, dim_candidates_from_means

    harm, safe, n_pos = _two_classes(tiny_bundle, prompts)
    full = ActivationCache(tmp_path / "full", shard_size=2).get(tiny_bundle, harm, n_pos, progress=False)
    sliced = ActivationCache(tmp_path / "sliced", shard_size=2)  # shards extracted by a slice, read back by others
    n_sites = tiny_bundle.n_layers + 1
    for layer, position in [(1, -1), (None, -1), (tiny_bundle.n_layers, None), (-1, 0), (None, None)]:
        expected = full[:, slice(None) if layer is None else layer, slice(None) if position is None else position]
        got = sliced.get(tiny_bundle, harm, n_pos, layer=layer, position=position, progress=False)
        assert torch.equal(got, expected), (layer, position)
        assert got.untyped_storage().nbytes() == got.numel() * 4  # its own memory, not a view of a shard
    with pytest.raises(IndexError):
        sliced.get(tiny_bundle, harm, n_pos, layer=n_sites, progress=False)
    torch.testing.assert_close(sliced.mean(tiny_bundle, harm, n_pos, progress=False), full.mean(0))
    full_safe = ActivationCache(tmp_path / "full", shard_size=2).get(tiny_bundle, safe, n_pos, progress=False)
    streamed = dim_candidates_from_means(sliced.mean(tiny_bundle, harm, n_pos, progress=False),
                                         sliced.mean(tiny_bundle, safe, n_pos, progress=False))
    torch.testing.assert_close(streamed, dim_candidates(full, full_safe), rtol=0, atol=1e-6)


def test_a_reader_holds_one_shard_at_a_time(tiny_bundle, prompts, tmp_path, monkeypatch):
    """Every shard read or extracted is freed before the next one is; reads are slices; no whole-file loader."""
    import weakref

    import refusal.runtime.activations as activations

    harm, _, n_pos = _two_classes(tiny_bundle, prompts)
    alive: list[weakref.ref] = []
    sizes: list[tuple[int, ...]] = []

    def tracked(real):
        def call(*args, **kwargs):
            assert all(ref() is None for ref in alive), "an earlier shard is still in memory"
            out = real(*args, **kwargs)
            alive.append(weakref.ref(out))
            sizes.append(tuple(out.shape))
            return out
        return call

    monkeypatch.setattr(activations, "extract_activations", tracked(activations.extract_activations))
    monkeypatch.setattr(activations, "read_shard", tracked(activations.read_shard))
    monkeypatch.setattr("refusal.artifacts.load_file", lambda *a, **k: pytest.fail("a shard was loaded whole"))
    cache = ActivationCache(tmp_path, shard_size=2)
    d, sites = tiny_bundle.d_model, tiny_bundle.n_layers + 1
    cache.get(tiny_bundle, harm, n_pos, layer=2, position=-1, progress=False)  # miss: extracted whole, sliced
    assert sizes == [(2, sites, n_pos, d), (2, sites, n_pos, d), (1, sites, n_pos, d)]
    for kwargs, shape in [({"layer": 2, "position": -1}, (d,)), ({"position": 0}, (sites, d)), ({"layer": 1}, (n_pos, d))]:
        sizes.clear()
        cache.get(tiny_bundle, harm, n_pos, progress=False, **kwargs)  # hit: only the slice is read
        assert sizes == [(2, *shape), (2, *shape), (1, *shape)]
    sizes.clear()
    cache.mean(tiny_bundle, harm, n_pos, progress=False)
    assert sizes == [(2, sites, n_pos, d), (2, sites, n_pos, d), (1, sites, n_pos, d)]  # one shard at a time
    assert all(ref() is None for ref in alive)


def test_a_corrupt_shard_is_recomputed_when_a_slice_is_read(tiny_bundle, prompts, tmp_path, monkeypatch):
    import refusal.artifacts as artifacts
    import refusal.runtime.activations as activations

    harm, _, n_pos = _two_classes(tiny_bundle, prompts)
    cache = ActivationCache(tmp_path, shard_size=2)
    full = cache.get(tiny_bundle, harm, n_pos, progress=False)
    stem = tmp_path / "tiny" / cache.key(tiny_bundle, harm, n_pos) / "shard00001"
    tensor_file = artifact_paths(stem)[0]
    blob = bytearray(tensor_file.read_bytes())
    blob[-5] ^= 0x01  # one bit, same size: only the checksum can tell
    tensor_file.write_bytes(bytes(blob))
    extracted, hashed = [], []
    real_extract, real_hash = activations.extract_activations, artifacts.sha256_file
    monkeypatch.setattr(activations, "extract_activations", lambda *a, **k: extracted.append(len(a[1])) or real_extract(*a, **k))
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: hashed.append(path) or real_hash(path))
    with pytest.warns(UserWarning, match="checksum"):
        part = cache.get(tiny_bundle, harm, n_pos, layer=3, position=-1, progress=False)
    assert extracted == [2] and torch.equal(part, full[:, 3, -1])  # only the corrupt shard, extracted again
    hashed.clear()
    assert torch.equal(cache.get(tiny_bundle, harm, n_pos, layer=0, progress=False), full[:, 0])
    assert [Path(p).name for p in hashed] == ["shard00001.safetensors"]  # the others were verified already
    hashed.clear()
    cache.get(tiny_bundle, harm, n_pos, position=-1, progress=False)
    assert hashed == [] and extracted == [2]  # each shard hashed once per cache object
    tensor_file.write_bytes(tensor_file.read_bytes()[:-7])  # changed since: verified again, recomputed
    with pytest.warns(UserWarning, match="checksum"):
        assert torch.equal(cache.get(tiny_bundle, harm, n_pos, position=-1, progress=False), full[:, :, -1])
    assert extracted == [2, 2]
