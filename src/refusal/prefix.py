"""Forward passes that run a token prefix shared by every row once, then continue each row from it.

Chat prompts open with the same template tokens (Qwen's system turn is 24 of ~40 tokens; a judge's
rubric adds ~100 more), so batches that repeat that prefix per row spend most of their FLOPs on
identical work. Running the prefix once and continuing every row from its key/value cache is the
same arithmetic on fewer tokens: logits equal the plain pass's to float tolerance (tested).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from refusal.models.bundle import ModelBundle


def common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix every row shares, leaving each row at least one token of its own."""
    if not rows:
        return []
    limit = min(len(r) for r in rows) - 1
    first = rows[0]
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return list(first[:n])


def forward(bundle: ModelBundle, rows: Sequence[Sequence[int]], *, offset: int = 0, past: Any = None,
            keep_cache: bool = False) -> Any:
    """One forward pass of left-padded ``rows`` (last position's logits only), continuing ``past``
    (a cache of ``offset`` prefix tokens, one per row) when given."""
    batch = bundle.pad(rows).to(bundle.device)
    mask = batch.attention_mask
    if offset:
        mask = torch.cat([mask.new_ones(len(rows), offset), mask], dim=1)
    return bundle.model(
        input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids + offset,
        cache=past, use_cache=keep_cache or past is not None, logits_to_keep=1,
    )


def prefix_cache(bundle: ModelBundle, prefix: Sequence[int], copies: int = 1) -> Any:
    """The key/value cache of ``prefix``, computed once and repeated for ``copies`` rows."""
    past = forward(bundle, [prefix], keep_cache=True).cache
    if copies > 1:
        past.batch_repeat_interleave(copies)
    return past


@torch.inference_mode()
def last_logits_shared(bundle: ModelBundle, rows: Sequence[Sequence[int]], prefix: Sequence[int],
                       past: Any = None) -> torch.Tensor:
    """``[len(rows), vocab]`` last-position logits of rows that all start with ``prefix``; ``past``: the
    prefix's cache for one row (computed here when None), reused for every call."""
    n = len(prefix)
    if n == 0:
        return forward(bundle, rows).logits[:, -1].float()
    base = past if past is not None else prefix_cache(bundle, prefix)
    cache = copy.deepcopy(base)  # the forward appends to it
    cache.batch_repeat_interleave(len(rows))
    return forward(bundle, [r[n:] for r in rows], offset=n, past=cache).logits[:, -1].float()
