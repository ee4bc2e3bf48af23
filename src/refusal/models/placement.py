"""Where a module runs: its device and dtype, also when ``model.device_map`` spread the model over devices.

With a device map, accelerate may run a module on a device other than the one its parameters sit on
(offloaded weights wait on ``meta`` and are streamed in): its hook's ``execution_device`` wins then.
Hooks place their constant tensors with these once, when they are built, never per forward.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn


def _execution_device(module: nn.Module) -> torch.device | None:
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return None


def module_device(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device ``module`` computes on: accelerate's execution device, else its first parameter's (or buffer's).

    An offloaded module's weights wait on ``meta``: accelerate's hook on it, or failing that the first hook
    on one of its submodules, says where it runs.
    """
    device = _execution_device(module)
    if device is not None:
        return device
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    if first is not None and first.device.type != "meta":
        return first.device
    for sub in module.modules():
        device = _execution_device(sub)
        if device is not None:
            return device
    return first.device if first is not None else torch.device(default)


def module_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (what its inputs and outputs carry)."""
    for param in module.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return default


def devices_of(modules: Iterable[nn.Module]) -> list[torch.device]:
    """The distinct devices ``modules`` compute on, in first-seen order."""
    seen: dict[torch.device, None] = {}
    for module in modules:
        seen.setdefault(module_device(module), None)
    return list(seen)
