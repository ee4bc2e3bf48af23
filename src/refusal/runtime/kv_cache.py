"""A key/value cache that reserves room for the tokens a decoding loop will add.

``transformers``' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies
the whole cache every step: at 128 rows of qwen05 that copy was 28% of a bfloat16-product decoding
step at 32 new tokens and grows with the budget (the cost of n steps is quadratic in n). A
:class:`ReservedLayer` holds the same tensors inside a buffer with room for ``reserve`` more tokens and
writes each step into it; attention reads a view of the filled part, so every value it sees is the
same (decoding stays bit-identical, tested).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer over ``[batch, heads, capacity, head_dim]`` buffers, filled up to ``length``."""

    def __init__(self, keys: Float[Tensor, "batch heads seq dim"], values: Float[Tensor, "batch heads seq dim"],
                 reserve: int):
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self.length = keys.shape[-2]
        self._key_buffer = self._with_room(keys, reserve)
        self._value_buffer = self._with_room(values, reserve)
        self._expose()

    @staticmethod
    def _with_room(states: Tensor, reserve: int) -> Tensor:
        b, h, n, d = states.shape
        buffer = states.new_empty(b, h, n + reserve, d)
        buffer[:, :, :n] = states
        return buffer

    def _expose(self) -> None:
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:  # past the reserve: double the room (amortised, never wrong)
            self._key_buffer = self._with_room(self.keys, max(end, 2 * self.length) - self.length)
            self._value_buffer = self._with_room(self.values, max(end, 2 * self.length) - self.length)
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
        self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
        self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        self._expose()

    def reset(self) -> None:
        self.length = 0
        self._expose()


def reserve(cache: Any, tokens: int) -> Any:
    """Give every filled full-attention layer of ``cache`` (a ``DynamicCache``) room for ``tokens`` more
    tokens, in place; sliding-window and other layer kinds keep their own update. Returns ``cache``."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            layers[i] = ReservedLayer(layer.keys, layer.values, tokens)
    return cache
