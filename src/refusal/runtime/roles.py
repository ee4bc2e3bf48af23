"""Token roles: which position of a forward pass is padding, instruction, chat template after the
instruction, or generated, declared by the code that runs the pass (:func:`token_roles`) and read by a
position-scoped hook (:func:`at_positions`). A forward pass whose length differs from the roles' (a
decoding step over the KV cache) holds generated tokens only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from refusal.runtime.hooks import Check, TensorFn

PAD, INSTRUCTION, POST_INSTRUCTION, GENERATED = 0, 1, 2, 3

_ROLES: ContextVar[dict[Any, Tensor] | None] = ContextVar("refusal_token_roles", default=None)


def role_grid(
    total_lengths: Sequence[int], prompt_lengths: Sequence[int], width: int, n_post: int
) -> Int[Tensor, "batch width"]:
    """Role of every position of a left-padded batch: PAD, INSTRUCTION, POST_INSTRUCTION or GENERATED.

    Row i holds ``total_lengths[i]`` tokens right-aligned in ``width``; its first ``prompt_lengths[i]``
    are the prompt, whose last ``n_post`` are the chat template after the instruction.
    """
    idx = torch.arange(width)[None]
    start = width - torch.as_tensor(total_lengths)[:, None]
    prompt_end = start + torch.as_tensor(prompt_lengths)[:, None]
    roles = torch.full((len(total_lengths), width), INSTRUCTION, dtype=torch.long)
    roles[idx >= prompt_end - n_post] = POST_INSTRUCTION
    roles[idx >= prompt_end] = GENERATED
    roles[idx < start] = PAD
    return roles


@contextmanager
def token_roles(roles: Int[Tensor, "batch width"], device: torch.device | str = "cpu") -> Iterator[None]:
    """Declare the roles of the positions of the forward passes run inside (see module doc)."""
    roles = roles.to(device)
    masks: dict[Any, Tensor] = {  # plus copies on other devices, keyed (positions, device), made on demand
        "prompt": (roles == INSTRUCTION) | (roles == POST_INSTRUCTION), "post_instruction": roles == POST_INSTRUCTION,
    }
    token = _ROLES.set(masks)
    try:
        yield
    finally:
        _ROLES.reset(token)


def current_mask(positions: str, seq_len: int, device: torch.device | None = None) -> Bool[Tensor, "batch seq"] | None:
    """The positions to edit in a forward pass of ``seq_len`` tokens, on ``device`` (default: where the
    roles were declared); None means none of them. A copy on another device (a block that
    ``model.device_map`` put on another GPU) is made once per declaration and reused."""
    masks = _ROLES.get()
    if masks is None:
        raise RuntimeError(f"intervention.positions={positions!r} needs token roles, but this forward pass declared none: "
                           "wrap it in refusal.runtime.roles.token_roles(...)")
    mask = masks[positions]
    if mask.shape[1] != seq_len:
        return None
    if device is None or mask.device == device:
        return mask
    moved = masks.get((positions, device))
    if moved is None:
        moved = masks[(positions, device)] = mask.to(device)
    return moved


def at_positions(fn: TensorFn, positions: str, check: Check | None = None) -> TensorFn:
    """``fn`` restricted to the positions in scope (``fn`` itself for ``all``: no overhead).

    ``check`` validates ``fn``'s first output before the mask is applied (where a wrong shape could
    broadcast unnoticed); for ``all`` the hook itself checks (see :class:`~refusal.runtime.hooks.HookSpec`).
    """
    if positions == "all":
        return fn
    call = fn

    if check is not None:
        def call(x: Tensor) -> Tensor:  # first call only; then ``masked`` calls fn itself
            nonlocal call
            out = fn(x)
            check(x, out)
            call = fn
            return out

    def masked(x: Tensor) -> Tensor:
        mask = current_mask(positions, x.shape[1], x.device)
        return x if mask is None else torch.where(mask[..., None], call(x), x)

    return masked


def declare_roles(bundle: Any, lengths: Sequence[int], width: int, prompt_lengths: Sequence[int] | None = None):
    """:func:`token_roles` for a left-padded batch of ``bundle``'s chat prompts (plus completions
    where ``prompt_lengths`` is shorter than ``lengths``)."""
    grid = role_grid(lengths, lengths if prompt_lengths is None else prompt_lengths, width, len(bundle.post_instruction_ids))
    return token_roles(grid, bundle.device)
