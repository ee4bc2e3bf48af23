"""Forward hooks that cost next to nothing and always come off.

Every hook edits the residual tensor in one fused expression (no Python loop over tokens or
sequences), and :func:`hooked` removes all handles on exit, even when the body raises, so the
model is bit-for-bit the unhooked model afterwards. A hook with a ``check`` validates its first
output only, then calls its edit directly: after that first call the check costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

TensorFn = Callable[[torch.Tensor], torch.Tensor]
#: ``check(x, fn(x))`` raises when an edit's output is unusable (wrong shape, dtype, non-finite...).
Check = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class HookSpec:
    """Apply ``fn`` to a module's input (``pre``) or output (``post``) residual tensor.

    ``device`` (pre hooks only): move the input there before ``fn``. A model that ``model.device_map``
    spread over devices hands a block the previous block's output, on the previous block's device;
    accelerate moves it only after the pre hooks ran, so a pre hook whose constants sit on its own
    module's device moves the residual first. None (one device) adds nothing to the call.

    ``check``: run on the first call only, on ``fn``'s input (after the move) and its output.
    """

    module: nn.Module
    fn: TensorFn
    kind: Literal["pre", "post"] = "post"
    device: torch.device | None = None
    check: Check | None = None


def _moved_first(fn: TensorFn, device: torch.device) -> TensorFn:
    def moved(x: torch.Tensor) -> torch.Tensor:
        return fn(x.to(device))

    return moved


def _pre_hook(fn: TensorFn, device: torch.device | None = None, check: Check | None = None):
    if device is not None:
        fn = _moved_first(fn, device)
    call = fn

    if check is not None:
        def call(x: torch.Tensor) -> torch.Tensor:  # first call only; then the hook calls fn itself
            nonlocal call
            out = fn(x)
            check(x if device is None else x.to(device), out)
            call = fn
            return out

    def hook(module, args, kwargs):
        if args:
            return (call(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = call(kwargs["hidden_states"])
        return args, kwargs

    return hook


def _post_hook(fn: TensorFn, check: Check | None = None):
    call = fn

    if check is not None:
        def call(x: torch.Tensor) -> torch.Tensor:  # first call only, as in _pre_hook
            nonlocal call
            out = fn(x)
            check(x, out)
            call = fn
            return out

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (call(output[0]), *output[1:])
        return call(output)

    return hook


@contextmanager
def hooked(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Register all hooks; remove every one of them on exit, error or not."""
    handles = []
    try:
        for spec in specs:
            if spec.kind == "pre":
                hook = _pre_hook(spec.fn, spec.device, spec.check)
                handles.append(spec.module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(spec.module.register_forward_hook(_post_hook(spec.fn, spec.check)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def residual_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states tensor a block or norm was called with."""
    return args[0] if args else kwargs["hidden_states"]
