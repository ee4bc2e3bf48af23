"""``model.matmul``: the decoder's matrix products in bfloat16 while everything else stays float32.

On CPUs with bfloat16 matrix units (AMX, AVX-512-BF16) a bfloat16 product runs 3-6× faster than a
float32 one, and a decoding step is almost all matrix products. ``model.dtype=bfloat16`` buys that
speed by storing the whole model, residual stream included, in bfloat16, whose 8-bit significand
the residual stream's sums then lose. ``model.matmul=bfloat16`` rounds only each linear layer inside
the blocks (its input, weight and output; the product accumulates in float32): the residual stream,
norms, attention softmax, hooks, the vocabulary head and every metric stay float32. The
float32 weights stay the master copy (weight export and in-place edits read and write them); the
bfloat16 copy is remade whenever they change.

On a CPU without bfloat16 matrix units torch computes a bfloat16 product slowly (qwen05, 16 prompts × 32 greedy
tokens on a 2-core AMD EPYC without AVX-512: 24.5 s, against 10.5 s in float32). There the same rounding runs on
float32 kernels instead (12.3 s): the product of two bfloat16 numbers is exact in float32, so rounding the input and
weight to bfloat16, multiplying in float32 and rounding the output gives the bfloat16 product up to the order of
the sums (which a kernel's blocking or thread count changes anyway): equal in 99.99% of outputs, the rest one
bfloat16 unit apart or, where a sum cancels to near zero, within float32's summation error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from refusal.errors import ConfigError

log = logging.getLogger(__name__)

MATMUL_DTYPES = ("float32", "bfloat16")
# bfloat16 products must beat float32 by this factor to count as fast on a device.
FAST_RATIO = 1.5


class Bf16Linear(nn.Linear):
    """A linear layer whose product runs in bfloat16 from its float32 weight (copied once per weight version);
    with ``emulate`` the same rounding runs on float32 kernels (see the module's docstring)."""

    emulate: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        held = self.__dict__.get("_bf16")
        # a copy made under inference mode cannot be saved for backward: remade once a pass is differentiable (RDO)
        if (held is None or held[0] != (weight.data_ptr(), weight._version)
                or (held[1].is_inference() and not torch.is_inference_mode_enabled())):
            rounded = weight.detach().to(torch.bfloat16)
            held = self.__dict__["_bf16"] = ((weight.data_ptr(), weight._version),
                                             rounded.float() if self.emulate else rounded)
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = nn.functional.linear(rows.to(held[1].dtype), held[1]).to(torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], y.shape[-1])


def use_bf16_matmuls(blocks: list[nn.Module], emulate: bool = False) -> int:
    """Turn every float32 ``nn.Linear`` inside ``blocks`` into a :class:`Bf16Linear` (same parameters,
    same hooks), its products emulated on float32 kernels with ``emulate``; returns how many."""
    count = 0
    for block in blocks:
        for module in block.modules():
            if type(module) is nn.Linear and module.weight.dtype == torch.float32:
                module.__class__ = Bf16Linear
                module.emulate = emulate
                count += 1
    return count


_SPEEDUP: dict[str, float] = {}


def bf16_speedup(device: torch.device | str = "cpu") -> float:
    """float32 time ÷ bfloat16 time of one product on ``device``, measured once per process: decoding-sized on a
    CPU; on a GPU large enough that the matrix units, not the kernel launch, set the time (at 64 × 1024 × 8192
    an H200 measured 1.4×, and the warning below wrongly told its users to leave bfloat16)."""
    key = str(device)
    if key not in _SPEEDUP:
        rows, d, out = (4096, 4096, 4096) if torch.device(device).type == "cuda" else (64, 1024, 8192)
        a, b = torch.randn(rows, d, device=device), torch.randn(out, d, device=device)
        ab, bb = a.bfloat16(), b.bfloat16()

        def best_of(x: torch.Tensor, w: torch.Tensor) -> float:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                nn.functional.linear(x, w)
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return min(times)

        best_of(ab, bb)  # the first bfloat16 product builds its kernel
        _SPEEDUP[key] = best_of(a, b) / best_of(ab, bb)
    return _SPEEDUP[key]


def bf16_is_fast(device: torch.device | str = "cpu") -> bool:
    return bf16_speedup(device) >= FAST_RATIO


def check_matmul(cfg: Mapping[str, Any]) -> str:
    """``model.matmul`` (before the model loads): a known dtype, and bfloat16 products only where the
    rest of the model is float32 (with ``model.dtype=bfloat16`` every product already is) and placed
    on one device."""
    matmul = str(cfg.get("matmul", "float32"))
    if matmul not in MATMUL_DTYPES:
        raise ConfigError(f"model.matmul={matmul!r} is not one of {MATMUL_DTYPES}; float32 is exact, bfloat16 rounds "
                          "each linear layer's inputs (fast on CPUs with AMX/AVX-512-BF16)")
    if matmul == "bfloat16" and str(cfg.get("dtype", "float32")) != "float32":
        raise ConfigError(f"model.matmul=bfloat16 needs model.dtype=float32 (got {cfg.get('dtype')}): with a half-precision "
                          "model every product already runs in it; drop model.matmul")
    if matmul == "bfloat16" and cfg.get("device_map") is not None:
        raise ConfigError("model.matmul=bfloat16 does not combine with model.device_map (accelerate's hooks call the "
                          "float32 product); use model.dtype=bfloat16 on GPUs")
    return matmul


def warn_if_slow(what: str, device: torch.device) -> None:
    """A bfloat16 setting on a device without fast bfloat16 products costs time: say how much, once."""
    ratio = bf16_speedup(device)
    if ratio < FAST_RATIO:
        log.warning("%s on %s: a bfloat16 product measured %.2f× the speed of a float32 one here (no bfloat16 matrix "
                    "units), so this setting makes every forward pass slower, not faster; use float32", what, device, ratio)
