"""A loaded model plus everything the rest of the framework needs to know about it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from refusal.artifacts import sha256_json
from refusal.errors import DataError
from refusal.models.architecture import ResidualLayout
from refusal.models.chat import ChatFormat
from refusal.models.placement import devices_of, module_device, module_dtype

T = TypeVar("T")


@dataclass(frozen=True)
class Batch:
    """Left-padded token batch with explicit positions (so padding never shifts RoPE)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device))


@dataclass
class ModelBundle:
    """Model, tokenizer, chat format and residual-stream layout of one chat model."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    chat: ChatFormat
    layout: ResidualLayout
    refusal_token_ids: list[int]
    weights_hash: str
    source: str
    extra: dict = field(default_factory=dict)
    # How the forward pass computes (see models.numerics): "float32", "bfloat16", "float32+bfloat16-matmul".
    numerics: str = "float32"
    # Results that depend only on this model and their inputs (see remember), kept while the model is held.
    memo: dict = field(default_factory=dict, repr=False)

    def remember(self, kind: str, inputs: Any, compute: Callable[[], T]) -> T:
        """``compute()`` for these ``inputs``, kept on the model until a call of the same ``kind`` brings other
        inputs (one entry per kind, dropped before recomputing): the unsteered logits that every job of a
        multirun scores against are computed once while the model is held."""
        digest = sha256_json(inputs)
        held = self.memo.get(kind)
        if held is None or held[0] != digest:
            self.memo.pop(kind, None)
            held = self.memo[kind] = (digest, compute())
        return held[1]

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (with ``model.device_map`` the model spans several)."""
        return module_device(self.layout.embedding)

    @property
    def dtype(self) -> torch.dtype:
        """The residual stream's dtype (the embedding's)."""
        return module_dtype(self.layout.embedding, next(self.model.parameters()).dtype)

    @property
    def devices(self) -> list[torch.device]:
        """Every device the model computes on, input first (one unless ``model.device_map`` spread it)."""
        layout = self.layout
        return devices_of([layout.embedding, *layout.blocks, layout.final_norm, layout.lm_head])

    @property
    def spans_devices(self) -> bool:
        return len(self.devices) > 1

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    @property
    def post_instruction_ids(self) -> list[int]:
        return self.chat.post_instruction_ids

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def identity(self) -> dict:
        """What artifacts fitted on this model must match."""
        return {"model": self.name, "weights_hash": self.weights_hash, "n_layers": self.n_layers, "d_model": self.d_model,
                **self.numerics_key()}

    def numerics_key(self) -> dict:
        """What cache keys of computed results add for numerics other than float32 (whose keys predate it)."""
        return {} if self.numerics == "float32" else {"numerics": self.numerics}

    def tokenize_instructions(self, instructions: Sequence[str]) -> list[list[int]]:
        """Chat-format and tokenize once; checks context length and the post-instruction suffix."""
        prompts = self.chat.format(instructions)
        ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        suffix = self.post_instruction_ids
        n = len(suffix)
        for text, row in zip(instructions, ids, strict=True):
            if len(row) > self.max_context:
                raise DataError(
                    f"a prompt has {len(row)} tokens, more than {self.name}'s context of {self.max_context}: "
                    f"{text[:60]!r}...; shorten or drop it"
                )
            if row[-n:] != suffix:
                raise DataError(
                    f"prompt tokens do not end with the post-instruction tokens {suffix} of {self.name}'s chat template "
                    f"(got {row[-n:]}); set model.chat_template to a template that ends the user turn consistently"
                )
        return ids

    def pad(self, rows: Sequence[Sequence[int]]) -> Batch:
        """Left-pad token rows into one batch with positions counted from each row's first real token."""
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return Batch(input_ids, mask, positions)
