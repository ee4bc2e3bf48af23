"""Forward passes that run a token prefix shared by every row once, then continue each row from it.

Chat prompts open with the same template tokens (Qwen's system turn is 24 of ~40 tokens; a judge's
rubric adds ~100 more), so batches that repeat that prefix per row spend most of their FLOPs on
identical work. Running the prefix once and continuing every row from its key/value cache is the
same arithmetic on fewer tokens: logits equal the plain pass's to float tolerance (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float

from refusal.models.bundle import ModelBundle
from refusal.runtime.roles import INSTRUCTION, token_roles

# A shorter common prefix is not worth a separate pass (prompts without a system turn share ~3 tokens).
MIN_SHARED = 8


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
            keep_cache: bool = False, logits_to_keep: int = 1) -> Any:
    """One forward pass of left-padded ``rows`` (the last ``logits_to_keep`` positions' logits),
    continuing ``past`` (a cache of ``offset`` prefix tokens, one per row) when given."""
    input_ids, mask, positions = _inputs(bundle, rows, offset)
    return bundle.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=past,
                        use_cache=keep_cache or past is not None, logits_to_keep=logits_to_keep)


def _inputs(bundle: ModelBundle, rows: Sequence[Sequence[int]], offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``rows`` after ``offset`` cached prefix tokens: input ids, the attention mask (prefix included)
    and the positions."""
    batch = bundle.pad(rows).to(bundle.device)
    mask = batch.attention_mask
    if offset:
        mask = torch.cat([mask.new_ones(len(rows), offset), mask], dim=1)
    return batch.input_ids, mask, batch.position_ids + offset


def last_logits_then_extended(
    bundle: ModelBundle, prefix: Sequence[int], rows: Sequence[Sequence[int]], keep: int,
    extend: Callable[[torch.Tensor], Sequence[Sequence[int]]],
) -> tuple[Float[torch.Tensor, "n keep vocab"], Float[torch.Tensor, "n vocab"]]:
    """:func:`last_logits` of ``prefix + row``, then the last position's logits of ``prefix + row + extend(first)[i]``
    (equally long extensions chosen from the first logits): the second pass continues the first's cache, so a
    question asked after an answer costs its own few tokens, not the whole text again."""
    past = prompt_prefix_cache(bundle, prefix, len(rows)) if prefix else None
    input_ids, mask, positions = _inputs(bundle, rows, len(prefix))
    out = bundle.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=past, use_cache=True,
                       logits_to_keep=keep)
    first = out.logits.float()
    extra = torch.tensor([list(e) for e in extend(first)], dtype=torch.long, device=bundle.device).view(len(rows), -1)
    steps = torch.arange(1, extra.shape[1] + 1, device=bundle.device)
    then = bundle.model(input_ids=extra, attention_mask=torch.cat([mask, mask.new_ones(extra.shape)], dim=1),
                        position_ids=positions[:, -1:] + steps, cache=out.cache, use_cache=True, logits_to_keep=1)
    return first, then.logits[:, -1].float()


def shared_prefix(rows: Sequence[Sequence[int]], keep_last: int) -> list[int]:
    """:func:`common_prefix`, short of each row's last ``keep_last`` tokens, when it is long enough to be
    worth running once, else ``[]`` (also for a single row: nothing to share). Callers keep the
    post-instruction tokens out of it: their pass declares those tokens' roles and reads their residuals
    (equal rows share all of themselves)."""
    if len(rows) < 2:
        return []
    prefix = common_prefix(rows)[: max(0, min(map(len, rows), default=0) - keep_last)]
    return prefix if len(prefix) >= MIN_SHARED else []


def prompt_prefix_cache(bundle: ModelBundle, prefix: Sequence[int], n_rows: int) -> Any:
    """The key/value cache of one prompt prefix, run once (with its positions declared prompt tokens, so
    a position-scoped intervention treats them as in the plain pass) and repeated for ``n_rows`` rows."""
    with token_roles(torch.full((1, len(prefix)), INSTRUCTION), bundle.device):
        past = prefix_cache(bundle, [prefix])
    past.batch_select_indices(torch.zeros(n_rows, dtype=torch.long, device=bundle.device))
    return past


def prefix_cache(bundle: ModelBundle, prefixes: Sequence[Sequence[int]]) -> Any:
    """The key/value cache of equally long ``prefixes`` (one slot each), for :func:`continue_rows`."""
    return forward(bundle, prefixes, keep_cache=True).cache


def continue_rows(bundle: ModelBundle, rows: Sequence[Sequence[int]], n_prefix: int, past: Any,
                  slots: Sequence[int]) -> torch.Tensor:
    """``[len(rows), vocab]`` last-position logits of rows whose first ``n_prefix`` tokens are already in
    ``past``: row i continues the cache's slot ``slots[i]``. ``past`` is consumed (selected, appended to)."""
    past.batch_select_indices(torch.tensor(list(slots), device=bundle.device))
    return forward(bundle, [r[n_prefix:] for r in rows], offset=n_prefix, past=past).logits[:, -1].float()


def last_logits(bundle: ModelBundle, prefix: Sequence[int], rows: Sequence[Sequence[int]], keep: int = 1) -> torch.Tensor:
    """Float32 logits of the last ``keep`` positions of ``prefix + row`` for every row (``rows`` without the
    prefix; the prefix runs once, as a prompt, when it is not empty)."""
    past = prompt_prefix_cache(bundle, prefix, len(rows)) if prefix else None
    return forward(bundle, rows, offset=len(prefix), past=past, logits_to_keep=keep).logits.float()
