"""Log-likelihood of each answer under the steered model, batched, the few-shot prefix run once per batch.

A request is a context and a continuation; its score is the summed log-probability of the continuation's
tokens given the context (what lm-evaluation-harness's ``loglikelihood`` returns), and an item's prediction
is its best-scored choice. Requests that need the same forward pass (MMLU's four one-token letters after
one context) share it. The intervention's hooks are on and its scope acts as in generation: context tokens
are the prompt (``positions=prompt`` edits them; a raw-text prompt has no chat-template tokens, so
``positions=post_instruction`` edits nothing here), continuation tokens are the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from jaxtyping import Float
from torch import Tensor

from refusal.interventions.base import Intervention
from refusal.models.bundle import ModelBundle
from refusal.runtime.activations import batches_by_length
from refusal.runtime.prefix import last_logits, shared_prefix
from refusal.runtime.roles import role_grid, token_roles


def encode(bundle: ModelBundle, contexts: Sequence[str], continuations: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each context and continuation, split as the harness does: the continuation is what the
    tokenization of ``context + continuation`` adds after the context's own tokens (with the tokenizer's
    special tokens, e.g. a BOS where the model has one)."""
    tok = bundle.tokenizer
    ctx = tok(list(contexts))["input_ids"]
    whole = tok([c + x for c, x in zip(contexts, continuations, strict=True)])["input_ids"]
    conts = []
    for c, w, x in zip(ctx, whole, continuations, strict=True):
        conts.append(w[len(c):] if w[: len(c)] == c and len(w) > len(c) else tok(x, add_special_tokens=False)["input_ids"])
    return ctx, conts


@torch.inference_mode()
def continuation_logprobs(
    bundle: ModelBundle,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    intervention: Intervention | None,
    batch_size: int,
) -> Float[Tensor, " requests"]:
    """Sum of log p(continuation | context) per request (float64), under ``intervention`` (None: unsteered).

    A request runs as ``context + continuation[:-1]``, left-truncated to the model's context length; the
    token prefix the rows share (the few-shot examples, when they hold one group) runs once per batch.
    """
    row_of: dict[tuple[int, ...], int] = {}  # forward pass (context + continuation[:-1]) -> row
    request_row, rows, keep = [], [], []
    for ctx, cont in zip(contexts, continuations, strict=True):
        if not cont:
            raise ValueError("an empty continuation has no log-likelihood")
        x = (*ctx, *cont[:-1])[-bundle.max_context:]
        if x not in row_of:
            row_of[x] = len(rows)
            rows.append(list(x))
            keep.append(0)
        request_row.append(row_of[x])
        keep[row_of[x]] = max(keep[row_of[x]], len(cont))
    requests_of: list[list[int]] = [[] for _ in rows]
    for r, k in enumerate(request_row):
        requests_of[k].append(r)
    prefix = shared_prefix(rows, max(keep, default=1))
    out = torch.zeros(len(contexts), dtype=torch.float64)
    for idx in batches_by_length([len(r) for r in rows], batch_size):
        own = [rows[k][len(prefix):] for k in idx]
        width, n_keep = max(map(len, own)), max(keep[k] for k in idx)
        # roles: a row ends with its continuation but the last token; those tokens are the answer, the rest the prompt
        prompt_lengths = [len(own[j]) - keep[k] + 1 for j, k in enumerate(idx)]
        roles = token_roles(role_grid([len(r) for r in own], prompt_lengths, width, 0), bundle.device)
        with roles, intervention.apply(bundle) if intervention is not None else nullcontext():
            logits = last_logits(bundle, prefix, own, n_keep)  # [batch, n_keep, vocab]
        log_z = torch.stack([row.logsumexp(-1) for row in logits])  # a row at a time: no second full-size tensor
        # every scored token of the batch's requests: the last len(cont) positions of its row predict cont
        req, row, pos, tok = [], [], [], []
        for j, k in enumerate(idx):
            for r in requests_of[k]:
                n = len(continuations[r])
                req += [r] * n
                row += [j] * n
                pos += range(n_keep - n, n_keep)
                tok += continuations[r]
        row_t, pos_t = torch.tensor(row, device=logits.device), torch.tensor(pos, device=logits.device)
        token_logprobs = logits[row_t, pos_t, torch.tensor(tok, device=logits.device)] - log_z[row_t, pos_t]
        out.index_add_(0, torch.tensor(req), token_logprobs.double().cpu())
    return out


def predictions(scores: Sequence[float], n_choices: Sequence[int]) -> list[int]:
    """The best-scored choice of each item (the first on a tie, as the harness's argmax), from the flat
    scores of every item's choices in order."""
    out, start = [], 0
    for n in n_choices:
        out.append(int(torch.as_tensor(scores[start:start + n]).argmax()))
        start += n
    return out
