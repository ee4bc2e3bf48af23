"""Teacher-forced scores of a run: perplexity of the unsteered model's own completions under the
intervention and KL(unsteered ‖ steered), per prompt and overall, cached by what determines them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from refusal.artifacts import atomic_write_json, sha256_json
from refusal.interventions import Intervention
from refusal.metrics.kl import kl_per_position
from refusal.metrics.perplexity import token_nll
from refusal.models.bundle import ModelBundle
from refusal.runtime.activations import batches_by_length
from refusal.runtime.prefix import last_logits, shared_prefix
from refusal.runtime.roles import declare_roles

# The unsteered logits of teacher-forced scoring are kept on the model for the next job up to this size,
# and one scoring batch's logits stay below SCORING_LOGITS_BYTES (rows per batch shrink for long completions;
# scoring holds about five tensors of that size at once: steered, unsteered, their log-softmaxes, a copy).
HELD_LOGITS_BYTES = 512 << 20
SCORING_LOGITS_BYTES = 256 << 20


@torch.inference_mode()
def teacher_forced_scores(
    bundle: ModelBundle,
    prompts: list[list[int]],
    completions: list[list[int]],
    intervention: Intervention | None,
    batch_size: int,
) -> dict[str, Any]:
    """Perplexity of ``completions`` and KL(unsteered ‖ steered) at the last prompt token and over them,
    overall and per prompt (``per_prompt``: each prompt's summed NLL, its token count, its next-token KL
    and its mean KL over the completion, in prompt order: what paired comparisons of two runs resample).

    Rows are left-padded, so every completion ends at the right edge: the vocabulary head runs only on
    the last ``longest completion + 1`` positions; the prompts' shared chat-template prefix runs once per
    batch. The unsteered logits are the same for every intervention scored on these rows, so they are
    computed once per loaded model and kept on it for the next job of a multirun, when they fit in
    :data:`HELD_LOGITS_BYTES`; larger ones are recomputed beside each batch's steered pass.
    """
    n = len(prompts)
    nll, tokens = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    kl_last, kl_completion = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    # Each batch holds [rows, longest completion + 1, vocab] float32 logits, steered and unsteered: bounded.
    per_row = 4 * bundle.model.config.vocab_size * (max(map(len, completions), default=0) + 1)
    batch_size = max(1, min(batch_size, SCORING_LOGITS_BYTES // per_row))
    batches = batches_by_length([len(r) for r in rows], batch_size)
    prefix = shared_prefix(prompts, len(bundle.post_instruction_ids))
    owns = [[rows[i][len(prefix):] for i in idx] for idx in batches]
    keeps = [max(len(completions[i]) for i in idx) + 1 for idx in batches]  # the last prompt token and every completion token
    held_bytes = 4 * bundle.model.config.vocab_size * sum(len(idx) * keep for idx, keep in zip(batches, keeps, strict=True))
    if held_bytes <= HELD_LOGITS_BYTES:
        unsteered = bundle.remember("unsteered_logits", {"rows": rows, "b": batch_size},
                                    lambda: [last_logits(bundle, prefix, own, keep) for own, keep in zip(owns, keeps, strict=True)])
    else:  # too big to hold for the next job (100 rows × 128 tokens of qwen's vocabulary are 7.8 GB): recompute per batch
        bundle.memo.pop("unsteered_logits", None)
        unsteered = (last_logits(bundle, prefix, own, keep) for own, keep in zip(owns, keeps, strict=True))
    for idx, own, keep, base in zip(batches, owns, keeps, unsteered, strict=True):
        target = torch.full((len(idx), keep), -100, dtype=torch.long)
        last_prompt = torch.tensor([keep - 1 - len(completions[i]) for i in idx])  # logits here predict the first completion token
        for j, i in enumerate(idx):
            if completions[i]:
                target[j, last_prompt[j]: keep - 1] = torch.tensor(completions[i])
        if intervention is None:
            steered = base
        else:
            width = max(map(len, own))
            roles = declare_roles(bundle, [len(r) for r in own], width, [len(prompts[i]) - len(prefix) for i in idx])
            with roles, intervention.apply(bundle):
                steered = last_logits(bundle, prefix, own, keep)
        target = target.to(base.device)
        counted = target != -100
        scored = counted.clone()
        scored[torch.arange(len(idx)), last_prompt] = True  # KL also at the last prompt position
        kl = torch.zeros(counted.shape, dtype=torch.float64, device=base.device)
        kl[scored] = kl_per_position(base[scored], steered[scored])
        at = torch.tensor(idx)
        nll[at] = token_nll(steered, target).sum(1).cpu()
        tokens[at] = counted.sum(1).cpu()
        kl_last[at] = kl[torch.arange(len(idx)), last_prompt].cpu()
        kl_completion[at] = (kl * counted).sum(1).cpu() / counted.sum(1).clamp_min(1).cpu()
        del steered
    total = int(tokens.sum())
    return {
        "perplexity": float(torch.exp(nll.sum() / total)) if total else float("nan"),
        "kl_div": float(kl_last.mean()),
        "kl_div_completion": float((kl_completion * tokens).sum() / total) if total else float("nan"),
        "per_prompt": {"nll": nll.tolist(), "tokens": tokens.tolist(), "kl_div": kl_last.tolist(),
                       "kl_div_completion": kl_completion.tolist()},
    }


def cached_scores(folder: Path, key: dict[str, Any], compute: Any) -> dict[str, float]:
    """Teacher-forced scores keyed by what determines them (weights, tokens, steering fingerprint), so a
    rerun of the same comparison recomputes nothing; an unreadable entry is recomputed."""
    path = folder / f"{sha256_json(key)[:24]}.json"
    try:
        saved = json.loads(path.read_text())
        if set(saved) == {"perplexity", "kl_div", "kl_div_completion", "per_prompt"}:
            return saved
    except (OSError, ValueError):
        pass
    scores = compute()
    atomic_write_json(path, scores)
    return scores
