"""model.matmul=bfloat16: each product in bfloat16 from float32 weights, the rest float32, keyed apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from refusal.errors import ConfigError
from refusal.models import load_model
from refusal.models.numerics import Bf16Linear, check_matmul, use_bf16_matmuls
from refusal.runtime.generation import GenerationCache


@pytest.mark.parametrize("emulate", [False, True])
def test_bf16_linear_is_the_product_of_rounded_inputs_accumulated_in_float32(emulate):
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=gen))
        layer.bias.copy_(torch.randn(32, generator=gen))
    x = torch.randn(3, 5, 64, generator=gen)
    plain = layer(x)
    use_bf16_matmuls([layer], emulate=emulate)
    assert isinstance(layer, Bf16Linear) and layer.emulate is emulate
    out = layer(x)
    want = (x.bfloat16().double() @ layer.weight.bfloat16().double().T).bfloat16().float() + layer.bias
    assert out.dtype == torch.float32 and out.shape == plain.shape
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert (out - plain).abs().max() > 0  # it does round
    with torch.no_grad():  # an in-place edit of the float32 master reaches the next product
        layer.weight.mul_(-1)
    torch.testing.assert_close(layer(x), -want + 2 * layer.bias, atol=1e-5, rtol=1e-5)


def test_emulated_bf16_products_equal_the_native_ones_up_to_summation_order():
    """The float32-kernel path (CPUs without bfloat16 units) against torch's own bfloat16 product, at a decoding
    shape of qwen05's MLP: the products of bfloat16 numbers are exact in float32, so only the order of the sums
    differs: that moves an output across a bfloat16 rounding boundary rarely, by one unit, or (where the sum
    cancels to near zero) by float32's summation error, which is relative to the sum of the terms' sizes."""
    gen = torch.Generator().manual_seed(1)
    native, emulated = nn.Linear(896, 4864, bias=False), nn.Linear(896, 4864, bias=False)
    with torch.no_grad():
        native.weight.copy_(torch.randn(4864, 896, generator=gen) * 0.05)
        emulated.weight.copy_(native.weight)
    use_bf16_matmuls([native])
    use_bf16_matmuls([emulated], emulate=True)
    x = torch.randn(16, 896, generator=gen)
    a, b = native(x), emulated(x)
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a.bfloat16().float(), a) and torch.equal(b.bfloat16().float(), b)  # both rounded outputs
    assert (a == b).float().mean() > 0.99
    one_unit = a.abs().maximum(b.abs()) * 2.0 ** -7  # bfloat16 keeps 8 significant bits
    terms = x.bfloat16().float().abs() @ native.weight.bfloat16().float().abs().T
    assert ((a - b).abs() <= one_unit + 896 * 2.0 ** -24 * terms).all()


def test_a_bf16_linear_used_under_inference_mode_then_differentiated_through():
    """Generation and scoring run under inference mode, RDO then backpropagates through the frozen layers to its
    direction: the bfloat16 weight copy made first must not end up saved for backward (a RuntimeError on qwen15)."""
    layer = nn.Linear(16, 8)
    use_bf16_matmuls([layer])
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 16)
    with torch.inference_mode():
        first = layer(x)
    direction = torch.randn(16, requires_grad=True)
    layer(x + direction).sum().backward()
    assert direction.grad is not None and float(direction.grad.abs().sum()) > 0
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)


def test_matmul_bfloat16_on_a_model_keys_its_results_apart(tmp_path):
    base = {"name": "tiny", "source": "tiny", "device": "cpu"}
    exact = load_model(base, tmp_path)
    fast = load_model({**base, "matmul": "bfloat16"}, tmp_path)
    assert (exact.numerics, fast.numerics) == ("float32", "float32+bfloat16-matmul")
    linears = [m for b in fast.layout.blocks for m in b.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, Bf16Linear) for m in linears)
    assert not isinstance(fast.layout.lm_head, Bf16Linear)  # the head stays float32 (scores, first-token logits)
    assert exact.identity() != fast.identity()
    rows = exact.tokenize_instructions(["Write a poem."])
    assert GenerationCache._key(exact, rows, 4, None) != GenerationCache._key(fast, rows, 4, None)
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        a, b = exact.model(ids).logits, fast.model(ids).logits
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()


def test_matmul_bfloat16_is_emulated_where_bfloat16_products_are_slow(tmp_path, monkeypatch, caplog):
    import refusal.models.numerics as numerics

    base = {"name": "tiny", "source": "tiny", "device": "cpu", "matmul": "bfloat16"}
    for ratio, emulated in ((0.4, True), (3.0, False)):  # 0.4: as measured on a CPU that emulates bfloat16
        monkeypatch.setitem(numerics._SPEEDUP, "cpu", ratio)
        caplog.clear()
        with caplog.at_level("INFO", logger="refusal.models.loader"):
            bundle = load_model(base, tmp_path)
        linears = [m for b in bundle.layout.blocks for m in b.modules() if isinstance(m, Bf16Linear)]
        assert linears and all(m.emulate is emulated for m in linears)
        assert bundle.numerics == "float32+bfloat16-matmul"  # the same rounding: the same name, the same caches
        assert ("0.40× float32's speed" in caplog.text and "float32 kernels" in caplog.text) is emulated
        assert "use float32" not in caplog.text


@pytest.mark.parametrize(("cfg", "words"), [
    ({"matmul": "int8"}, "not one of"),
    ({"matmul": "bfloat16", "dtype": "bfloat16"}, "needs model.dtype=float32"),
    ({"matmul": "bfloat16", "device_map": "auto"}, "model.device_map"),
])
def test_bad_matmul_settings_fail_before_loading(cfg, words):
    with pytest.raises(ConfigError, match=words):
        check_matmul(cfg)


def test_a_slow_bfloat16_model_warns_with_the_measured_ratio(tmp_path, monkeypatch, caplog):
    import refusal.models.numerics as numerics

    monkeypatch.setitem(numerics._SPEEDUP, "cpu", 0.4)  # as measured on a CPU that emulates bfloat16
    with caplog.at_level("WARNING", logger="refusal.models.numerics"):
        load_model({"name": "tiny", "source": "tiny", "device": "cpu", "dtype": "bfloat16"}, tmp_path)
    assert "0.40× the speed of a float32 one" in caplog.text and "use float32" in caplog.text
    caplog.clear()
    monkeypatch.setitem(numerics._SPEEDUP, "cpu", 3.0)
    with caplog.at_level("WARNING", logger="refusal.models.numerics"):
        load_model({"name": "tiny", "source": "tiny", "device": "cpu", "dtype": "bfloat16"}, tmp_path)
    assert "speed of a float32" not in caplog.text

