"""Big models on CPU-testable terms: model.dtype end to end, model.device_map, hook constants that follow
their module's device and dtype, and the memory estimate logged before a model loads.

A second real device is not available here, so a model split over devices is the tiny model dispatched by
accelerate with its last blocks on ``meta`` (shapes without data): a hook whose constants sat on the
wrong device fails there exactly as on a second GPU ("Tensor on device cpu is not on the expected device
meta"). What only a multi-GPU machine shows (speed, real placement by ``auto``) is bench/gpu_check.sh's.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import random_unit
from test_interventions import FakeINLP, capture_block_inputs, forward, make

from refusal.config import check_config
from refusal.errors import ConfigError
from refusal.fitting.dim import CandidateScorer
from refusal.interventions import DiMDirection, Fitted, Intervention
from refusal.metrics import KLDivergence, RefusalScore
from refusal.models import load_model
from refusal.models.held import held_key
from refusal.models.loader import resolve_device_map
from refusal.models.memory import (
    MemoryEstimate,
    count_parameters,
    declared_shape,
    estimate_memory,
    model_shape,
    working_set_bytes,
)
from refusal.models.placement import module_device, module_dtype
from refusal.models.tiny import build_tiny_model, build_tiny_tokenizer, tiny_config
from refusal.runtime.hooks import HookSpec, hooked
from refusal.runtime.roles import current_mask, role_grid, token_roles

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STEERING = ["actadd", "dim_ablation", "inlp_nullspace", "inlp_flip", "leace_erase", "leace_flip"]
# blocks 2 and 3 and the head on a second device: the split a two-GPU device_map makes, with "meta" for GPU 1
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
         "model.layers.2": "meta", "model.layers.3": "meta", "model.norm": "meta", "lm_head": "meta"}


def fake_fits(d: int) -> Fitted:
    """Float32 fits on CPU, as artifacts are saved: DiM, INLP (k=4) and a rank-1 LEACE."""
    unit = random_unit(d, 3)
    centre = 0.1 * random_unit(d, 4)
    leace = SimpleNamespace(proj_left=unit[:, None], proj_right=unit[None], bias=centre, midpoint=centre)
    return Fitted(dim=DiMDirection(3.0 * random_unit(d, 1), layer=2, position=-1), inlp=FakeINLP(d, 4),
                  inlp_layer=2, leace=leace)


@pytest.fixture(scope="module", params=list(DTYPES))
def typed_bundle(request, tmp_path_factory):
    """(dtype, tiny loaded with model.dtype=<that dtype>)."""
    cfg = {"name": "tiny", "source": "tiny", "device": "cpu", "dtype": request.param}
    return DTYPES[request.param], load_model(cfg, tmp_path_factory.mktemp("cache"))


def split_tiny(cache_dir):
    """tiny spread over cpu and meta as from_pretrained(device_map=...) spreads a checkpoint over two GPUs;
    outputs stay where the last module ran."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    bundle = load_model({"name": "tiny", "source": "tiny", "device": "cpu"}, cache_dir)
    # main_device=cpu: in a GPU map "cpu" means offloaded weights run on the first GPU; here cpu is "GPU 0"
    dispatch_model(bundle.model, device_map=SPLIT, main_device="cpu")
    remove_hook_from_module(bundle.model)  # the top-level hook would copy meta logits back to cpu: no data
    return bundle


@pytest.fixture(scope="module")
def split_bundle(tmp_path_factory):
    return split_tiny(tmp_path_factory.mktemp("cache"))


class Recorder(Intervention):
    """No name, so not registered: records where ``cast`` put each constant, edits nothing."""

    needs = frozenset({"dim"})
    default_layers = "all"
    edits_writes = True

    def __init__(self, cfg, fitted):
        super().__init__(cfg, fitted)
        self.placed: list[tuple[str, int, torch.Tensor]] = []

    def residual_edit(self, layer, cast):
        self.placed.append(("block", layer, cast(self.fitted.dim.direction)))
        return lambda x: x

    def write_edit(self, layer, cast):
        self.placed.append(("writes", layer, cast(self.fitted.dim.direction)))
        return lambda w: w


# -- model.dtype end to end -------------------------------------------------------------------------
def test_dtype_reaches_the_model_and_the_residual_stream_keeps_it(typed_bundle, prompts):
    dtype, typed_bundle = typed_bundle
    assert typed_bundle.dtype == dtype and all(p.dtype == dtype for p in typed_bundle.model.parameters())
    ids = typed_bundle.tokenize_instructions(prompts)
    fitted = fake_fits(typed_bundle.d_model)
    base = forward(typed_bundle, ids)
    assert base.dtype == dtype
    for name in STEERING:
        seen: list[torch.Tensor] = []
        with make(name, fitted).apply(typed_bundle), hooked(capture_block_inputs(typed_bundle, seen)):
            steered = forward(typed_bundle, ids)
        # float32 constants applied to a half-precision residual would promote it: every block input keeps the dtype
        assert {x.dtype for x in seen} == {dtype}, name
        assert steered.dtype == dtype and torch.isfinite(steered).all(), name
        assert torch.equal(forward(typed_bundle, ids), base), f"{name}: hooks off must restore the logits exactly"
        # metrics read half-precision logits in float32 (float64 accumulators) and stay finite
        score = RefusalScore(typed_bundle.refusal_token_ids)
        score.update(steered[:, -1])
        kl = KLDivergence()
        kl.update(base[:, -1], steered[:, -1])
        assert score.compute().dtype == torch.float32 and torch.isfinite(score.compute())
        assert kl.compute().dtype == torch.float32 and float(kl.compute()) > 0


def test_dim_ablation_in_bfloat16_leaves_no_component_on_the_direction(tmp_path, prompts):
    bundle = load_model({"name": "tiny", "source": "tiny", "device": "cpu", "dtype": "bfloat16"}, tmp_path)
    ids = bundle.tokenize_instructions(prompts)
    fitted = fake_fits(bundle.d_model)
    unit = fitted.dim.unit.double()
    eps = torch.finfo(torch.bfloat16).eps  # 2^-7 spacing near 1: one rounding of a bf16 value

    def worst(seen):  # largest |x·r̂| relative to |x|, over every block input and position
        return max(float(((x.double() @ unit).abs() / x.double().norm(dim=-1).clamp_min(1e-6)).max()) for x in seen)

    seen: list[torch.Tensor] = []
    with make("dim_ablation", fitted).apply(bundle), hooked(capture_block_inputs(bundle, seen)):
        forward(bundle, ids)
    baseline: list[torch.Tensor] = []
    with hooked(capture_block_inputs(bundle, baseline)):
        forward(bundle, ids)
    assert len(seen) == bundle.n_layers + 1
    # the projection is computed in bf16: what is left is rounding, a few eps of |x|, never the signal
    assert worst(seen) < 4 * eps < worst(baseline)


def test_actadd_in_bfloat16_shifts_by_c_r_to_bf16_rounding(tmp_path, prompts):
    bundle = load_model({"name": "tiny", "source": "tiny", "device": "cpu", "dtype": "bfloat16"}, tmp_path)
    ids = bundle.tokenize_instructions(prompts)
    fitted = fake_fits(bundle.d_model)
    layer = fitted.dim.layer
    before, after = [], []
    with hooked([HookSpec(bundle.layout.blocks[layer], lambda x: before.append(x.clone()) or x, "pre")]):
        forward(bundle, ids)
    with make("actadd", fitted, coeff=-2.0).apply(bundle), hooked(
        [HookSpec(bundle.layout.blocks[layer], lambda x: after.append(x.clone()) or x, "pre")]
    ):
        forward(bundle, ids)
    shift = (after[0].double() - before[0].double()).mean(dim=(0, 1))
    expected = -2.0 * fitted.dim.direction.to(torch.bfloat16).double()
    scale = float(before[0].double().abs().max()) + float(expected.abs().max())
    torch.testing.assert_close(shift, expected, rtol=0, atol=2 * torch.finfo(torch.bfloat16).eps * scale)


# -- hook constants follow their module -------------------------------------------------------------
def test_hook_constants_take_each_module_s_dtype(tmp_path, prompts):
    bundle = load_model({"name": "tiny", "source": "tiny", "device": "cpu"}, tmp_path)
    bundle.model.to(torch.float64)  # no config asks for float64; it is a dtype the default float32 never is
    fitted = fake_fits(bundle.d_model)
    recorder = Recorder({"name": "recorder"}, fitted)
    specs = recorder.hook_specs(bundle)
    assert {t.dtype for _, _, t in recorder.placed} == {torch.float64}
    assert [(kind, layer) for kind, layer, _ in recorder.placed] == [
        (kind, layer) for layer in range(bundle.n_layers) for kind in ("block", "writes")]  # one write edit per layer
    assert all(s.device is None for s in specs)  # one device: the hooks move nothing, per call or ever
    # a float64 direction on a float64 model: the ablation is exact to float64 rounding (float32 constants: ~1e-8)
    ids = bundle.tokenize_instructions(prompts)
    fitted.dim = DiMDirection(fitted.dim.direction.double(), fitted.dim.layer, fitted.dim.position)
    seen: list[torch.Tensor] = []
    with make("dim_ablation", fitted).apply(bundle), hooked(capture_block_inputs(bundle, seen)):
        forward(bundle, ids)
    assert {x.dtype for x in seen} == {torch.float64}
    assert max(float((x @ fitted.dim.unit).abs().max()) for x in seen) < 1e-12


def test_model_split_over_devices_places_inputs_and_hook_constants_per_module(split_bundle):
    bundle = split_bundle
    assert bundle.device == torch.device("cpu")  # the embedding's: where inputs go
    assert bundle.devices == [torch.device("cpu"), torch.device("meta")] and bundle.spans_devices
    recorder = Recorder({"name": "recorder"}, fake_fits(bundle.d_model))
    specs = recorder.hook_specs(bundle)
    for _, layer, tensor in recorder.placed:
        assert tensor.device == (torch.device("meta") if layer >= 2 else torch.device("cpu"))
    pre = [s for s in specs if s.kind == "pre"]
    assert [s.device for s in pre] == [module_device(b) for b in bundle.layout.blocks]
    assert module_device(bundle.layout.blocks[3]) == torch.device("meta") and module_dtype(bundle.layout.blocks[3]) == torch.float32


@pytest.mark.parametrize("name", STEERING)
@pytest.mark.parametrize("positions", ["all", "post_instruction"])
def test_every_intervention_runs_on_a_model_split_over_devices(split_bundle, prompts, name, positions):
    """Block 2 receives block 1's output on cpu while its constants sit on meta: the pre hook moves the
    residual first, and a position scope reads its mask on the residual's device."""
    bundle = split_bundle
    ids = bundle.tokenize_instructions(prompts)
    batch = bundle.pad(ids).to(bundle.device)
    fitted = fake_fits(bundle.d_model)
    layers = {"layers": "all"} if name in ("dim_ablation", "inlp_nullspace", "leace_erase") else {"layers": [1, 2, 3]}
    seen: list[torch.Tensor] = []
    grid = role_grid([len(r) for r in ids], [len(r) for r in ids], batch.input_ids.shape[1], len(bundle.post_instruction_ids))
    with token_roles(grid, bundle.device), make(name, fitted, positions=positions, **layers).apply(bundle), \
            hooked(capture_block_inputs(bundle, seen)):
        logits = bundle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids).logits
    assert logits.device == torch.device("meta") and logits.shape == (*batch.input_ids.shape, len(bundle.tokenizer))
    assert [x.device.type for x in seen] == ["cpu", "cpu", "meta", "meta", "meta"]


def test_offloaded_blocks_get_constants_where_accelerate_runs_them(tmp_path, prompts):
    """Blocks a device map sends to "disk" keep their weights on meta until accelerate streams them to the
    execution device (here cpu): hook constants must go there, not to the parameters' meta."""
    offload = {**SPLIT, "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    offload.update({k: "cpu" for k, v in offload.items() if v == "meta"})
    bundle = load_model({"name": "tiny", "source": "tiny", "device_map": offload}, tmp_path)
    plain = load_model({"name": "tiny", "source": "tiny", "device": "cpu"}, tmp_path)
    writer = bundle.layout.attn_writers[3]
    assert next(writer.parameters()).device.type == "meta" and module_device(writer) == torch.device("cpu")
    assert bundle.devices == [torch.device("cpu")] and not bundle.spans_devices
    assert any((tmp_path / "offload" / "tiny").rglob("index.json"))  # offloaded under cache_dir
    ids = bundle.tokenize_instructions(prompts)
    fitted = fake_fits(bundle.d_model)
    before = forward(bundle, ids)
    torch.testing.assert_close(before, forward(plain, ids), rtol=0, atol=1e-6)
    for name in STEERING:
        with make(name, fitted).apply(bundle):
            steered = forward(bundle, ids)
        with make(name, fitted).apply(plain):
            expected = forward(plain, ids)
        torch.testing.assert_close(steered, expected, rtol=0, atol=1e-5)
        assert torch.equal(forward(bundle, ids), before)


def test_dim_selection_scorer_runs_on_a_model_split_over_devices(split_bundle, prompts):
    bundle = split_bundle
    ids = bundle.tokenize_instructions(prompts)
    scorer = CandidateScorer(bundle, ids[:2], ids[2:], batch_size=8, progress=False, share_prefix=False)
    directions = torch.stack([random_unit(bundle.d_model, 1), random_unit(bundle.d_model, 2)])
    scorer._state = {"unit": directions, "shift": {2: directions}}
    logits = scorer._last_logits(ids[:2] * 2, [0, 0, 1, 1], scorer._ablation_specs() + scorer._actadd_specs([2]))
    assert logits.device == torch.device("meta") and logits.shape == (4, len(bundle.tokenizer))
    assert set(scorer._state["unit_rows"]) == {torch.device("cpu"), torch.device("meta")}


def test_weight_orthogonalization_of_a_model_split_over_devices(tmp_path):
    from refusal.interventions.export import orthogonalize_

    bundle = split_tiny(tmp_path)
    unit = random_unit(bundle.d_model, 7)
    orthogonalize_(bundle.model, unit)  # each weight projected on its own device
    layout = bundle.layout
    assert float((layout.embedding.weight @ unit).abs().max()) < 1e-6
    assert float((unit @ layout.mlp_writers[1].down_proj.weight).abs().max()) < 1e-6
    assert layout.mlp_writers[3].down_proj.weight.device.type == "meta"


def test_role_masks_are_copied_once_to_the_hooked_tensor_s_device():
    grid = role_grid([5, 3], [5, 3], 5, 2)
    with token_roles(grid, "cpu"):
        here = current_mask("post_instruction", 5, torch.device("cpu"))
        there = current_mask("post_instruction", 5, torch.device("meta"))
        assert here.device.type == "cpu" and there.device.type == "meta" and there.shape == here.shape
        assert current_mask("post_instruction", 5, torch.device("meta")) is there  # memoised per declaration
        assert current_mask("post_instruction", 1, torch.device("meta")) is None  # a decoding step: generated only


# -- model.device_map -------------------------------------------------------------------------------
def test_device_map_goes_to_from_pretrained_and_the_model_is_not_moved(tiny_bundle, tmp_path, prompts, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "ckpt"
    tiny_bundle.model.save_pretrained(folder)
    tiny_bundle.tokenizer.save_pretrained(folder)
    seen: list = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    ids = tiny_bundle.tokenize_instructions(prompts)
    reference = forward(tiny_bundle, ids)
    # model.device=cuda would fail on this machine (no GPU): with a device map it is not used at all
    for device_map in ("auto", {"": "cpu"}):
        cfg = {"name": "local", "source": "local", "path": str(folder), "device": "cuda", "device_map": device_map}
        bundle = load_model(cfg, tmp_path)
        assert bundle.device == torch.device("cpu") and not bundle.spans_devices
        torch.testing.assert_close(forward(bundle, ids), reference, rtol=0, atol=1e-6)
    assert seen == ["auto", {"": "cpu"}]


def test_device_map_on_the_tiny_model_dispatches_it(tmp_path, prompts):
    plain = load_model({"name": "tiny", "source": "tiny", "device": "cpu"}, tmp_path)
    spread = load_model({"name": "tiny", "source": "tiny", "device_map": "auto"}, tmp_path)
    ids = plain.tokenize_instructions(prompts)
    assert spread.device == torch.device("cpu") and spread.weights_hash == plain.weights_hash
    assert torch.equal(forward(spread, ids), forward(plain, ids))


@pytest.mark.parametrize("value, fix", [
    ("everywhere", "one of auto, balanced"),
    ("cuda", "set model.device=cuda and leave model.device_map null"),
    ({"model.layers": -1}, "must be a GPU index"),
    ({"model.layers": "gpu9"}, "must be a GPU index"),
    ({"model.layers": True}, "must be a GPU index"),
    ({}, "mapping of module names to devices"),
    (["auto"], "mapping of module names to devices"),
])
def test_bad_device_map_is_a_config_error_naming_the_fix(value, fix):
    with pytest.raises(ConfigError, match="model.device_map") as err:
        resolve_device_map(value)
    assert fix in str(err.value)


def test_good_device_maps_pass_through():
    assert resolve_device_map(None) is None
    assert resolve_device_map("balanced") == "balanced"
    assert resolve_device_map({"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu", "x": "disk"}) == \
        {"model.embed_tokens": 0, "model.layers": "cuda:1", "lm_head": "cpu", "x": "disk"}


@pytest.mark.parametrize("override, message", [
    ("model.device_map=everywhere", "model.device_map='everywhere' must be null"),
    ("model.dtype=float8", "model.dtype='float8' is not one of"),
    ("model.device=gpu", "model.device='gpu' is not a device"),
])
def test_placement_errors_come_before_the_model_loads(compose, override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose(override))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_config_error(compose):
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU.*model.device=cpu"):
        check_config(compose("model.device=cuda"))


def test_held_model_key_spells_out_dtype_and_device_map(tmp_path):
    cfg = {"name": "tiny", "source": "tiny"}
    assert held_key(cfg, tmp_path) == held_key({**cfg, "dtype": "float32", "device_map": None}, tmp_path)
    keys = {held_key(cfg, tmp_path), held_key({**cfg, "dtype": "bfloat16"}, tmp_path),
            held_key({**cfg, "device_map": "auto"}, tmp_path), held_key({**cfg, "device_map": {"": 0}}, tmp_path)}
    assert len(keys) == 4


# -- memory estimate --------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_from_the_config_is_the_model_s(tied):
    tokenizer = build_tiny_tokenizer()
    sizes = {"n_layers": 3, "d_model": 32, "n_heads": 4, "d_mlp": 80, "tie_word_embeddings": tied}
    model = build_tiny_model(tokenizer, **sizes)
    assert count_parameters(tiny_config(tokenizer, **sizes)) == sum(p.numel() for p in model.parameters())


def test_declared_sizes_formula():
    # per layer 4·8² attention + 3·8·16 MLP + 2·8 norms = 656; embedding and head 10·8 each; final norm 8
    assert declared_shape(2, 8, vocab_size=10, d_mlp=16).n_params == 2 * 656 + 2 * 80 + 8
    assert declared_shape(2, 8, vocab_size=10, d_mlp=16, tied=True).n_params == 2 * 656 + 80 + 8
    # tiny from its declared sizes: full multi-head attention where tiny has grouped KV heads, so a little over
    real = sum(p.numel() for p in build_tiny_model(build_tiny_tokenizer()).parameters())
    guess = declared_shape(4, 64, vocab_size=len(build_tiny_tokenizer()), d_mlp=128).n_params
    assert real < guess < 1.1 * real


def test_working_set_arithmetic():
    shape = declared_shape(2, 8, vocab_size=10, d_mlp=16)
    # bf16, 3 sequences × 4 tokens = 12 positions: KV 2·2·12·8·2, block 12·(32+32)·2, logits 12·10·(2+4)
    assert working_set_bytes(shape, torch.bfloat16, 3, 4) == 768 + 1536 + 720
    # float32 logits need no float32 copy
    assert working_set_bytes(shape, torch.float32, 3, 4) == 1536 + 3072 + 480


def test_estimate_for_tiny_counts_its_weights_exactly(tiny_bundle, tmp_path):
    n_params = sum(p.numel() for p in tiny_bundle.model.parameters())
    for name, dtype in DTYPES.items():
        estimate = estimate_memory({"name": "tiny", "source": "tiny", "batch_size": 8}, tmp_path, dtype,
                                   torch.device("cpu"))
        assert estimate.shape.exact and estimate.shape.n_params == n_params
        assert estimate.weights_bytes == n_params * (4 if name == "float32" else 2)
        assert estimate.working_bytes == working_set_bytes(estimate.shape, dtype, 8, estimate.tokens)
        line = estimate.line()
        assert line.startswith("tiny: ~") and f"parameters, {name})" in line and "batch 8 × 128 tokens" in line
        assert "device cpu" in line and ("GiB free" in line or "free memory unknown" in line)


def test_the_bfloat16_matmul_copy_is_counted_at_its_real_size(tiny_bundle, tmp_path, caplog, monkeypatch):
    """model.matmul=bfloat16 keeps a rounded copy of every block projection (numerics.Bf16Linear): the estimate's
    count of those weights equals the tiny model's own, at 2 bytes each natively and 4 where emulated."""
    import refusal.models.loader as loader

    held = sum(m.weight.numel() for block in tiny_bundle.layout.blocks for m in block.modules()
               if isinstance(m, torch.nn.Linear))
    cfg = {"name": "tiny", "source": "tiny", "batch_size": 8, "device": "cpu", "matmul": "bfloat16"}
    plain = estimate_memory(cfg, tmp_path, torch.float32, torch.device("cpu"))
    assert plain.shape.block_linear_params == held and plain.copy_bytes == 0
    for fast, per_weight in ((True, 2), (False, 4)):
        monkeypatch.setattr(loader, "bf16_is_fast", lambda device, fast=fast: fast)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="refusal.models"):
            loader._log_memory_estimate(cfg, tmp_path, torch.float32, torch.device("cpu"), None)
        estimate = estimate_memory(cfg, tmp_path, torch.float32, torch.device("cpu"), matmul_copy_bytes=per_weight)
        assert estimate.copy_bytes == held * per_weight
        assert estimate.total_bytes == plain.total_bytes + held * per_weight
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("tiny: ~"))
        assert line == estimate.line() and "bfloat16-rounded block weights" in line
        assert ("kept in float32" in line) is (not fast)


def test_estimate_reads_a_local_checkpoint_config_and_falls_back_to_declared_sizes(tiny_bundle, tmp_path):
    folder = tmp_path / "ckpt"
    tiny_bundle.model.save_pretrained(folder)
    shape = model_shape({"name": "local", "source": "local", "path": str(folder)}, tmp_path)
    assert shape.exact and shape.n_params == sum(p.numel() for p in tiny_bundle.model.parameters())
    assert shape.kv_dim == 2 * 16 and shape.vocab_size == len(tiny_bundle.tokenizer)  # 2 KV heads of 16
    declared = model_shape({"name": "qwen05", "source": "gguf_package", "n_layers": 24, "d_model": 896,
                            "gguf": {"sha256": "0" * 64}}, tmp_path)  # not dequantized in this cache
    assert not declared.exact and declared.n_layers == 24 and declared.vocab_size == 32_000
    assert model_shape({"name": "local", "source": "local", "path": str(tmp_path / "nope")}, tmp_path) is None


def test_too_big_warns_with_the_numbers_and_unknown_room_does_not():
    shape = declared_shape(24, 896)
    tight = MemoryEstimate("big", shape, torch.float32, 32, 128, "cuda:0", free_bytes=1 << 20)
    assert tight.fits is False
    warning = tight.warning()
    need = tight.total_bytes / (1 << 30)
    assert f"big may not fit: it needs ~{need:.1f} GiB (weights + working set) but cuda:0 has 1.0 MiB free" in warning
    assert "model.dtype=bfloat16" in warning and "model.device_map=auto" in warning and "the run goes on" in warning
    assert "model.device_map" not in tight.warning(device_map="auto")
    copied = MemoryEstimate("big", shape, torch.float32, 32, 128, "cpu", free_bytes=1 << 20, matmul_copy_bytes=4)
    assert copied.total_bytes == tight.total_bytes + 4 * shape.block_linear_params
    assert "(weights + their bfloat16 copy + working set)" in copied.warning()
    assert MemoryEstimate("big", shape, torch.float32, 32, 128, "mps", free_bytes=None).warning() is None
    roomy = MemoryEstimate("big", shape, torch.float32, 32, 128, "cpu", free_bytes=1 << 50)
    assert roomy.fits and roomy.warning() is None


def test_the_estimate_is_logged_before_the_model_loads_and_a_misfit_only_warns(tmp_path, caplog, monkeypatch):
    import refusal.models.loader as loader

    logged_at_build: list[str] = []
    build = loader._from_tiny

    def spy(cfg):
        logged_at_build.extend(r.getMessage() for r in caplog.records)
        return build(cfg)

    monkeypatch.setattr(loader, "_from_tiny", spy)
    monkeypatch.setattr("refusal.models.memory.free_memory", lambda device, device_map=None: ("cpu", 1 << 20))
    with caplog.at_level(logging.INFO, logger="refusal.models"):
        bundle = load_model({"name": "tiny", "source": "tiny", "device": "cpu"}, tmp_path)
    assert bundle.n_layers == 4  # loaded all the same
    assert any(m.startswith("tiny: ~") and "working set" in m for m in logged_at_build)
    assert any("tiny may not fit" in m and "cpu has 1.0 MiB free" in m for m in logged_at_build)
