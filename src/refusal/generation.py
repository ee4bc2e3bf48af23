"""Batched greedy generation with left padding and KV cache, plus its disk cache.

Prompts are batched by length; the first step's raw logits come back with the text, so the
first-token refusal score needs no extra forward pass. The unsteered model's generations are
cached (they are the baseline of every run and the text that perplexity is measured on), and so
are steered ones, keyed by the intervention's fingerprint (its code, config, scope and fitted
tensors), so rerunning a comparison regenerates nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal.activations import batches_by_length
from refusal.artifacts import artifact_exists, atomic_write_json, load_artifact, save_artifact, sha256_json
from refusal.errors import ArtifactError
from refusal.interventions.scope import declare_roles
from refusal.models.bundle import ModelBundle


@dataclass
class Generations:
    completions: list[str]
    completion_ids: list[list[int]]
    first_logits: torch.Tensor  # [n, vocab] float32, raw logits of the first generated token


@torch.inference_mode()
def generate(
    bundle: ModelBundle,
    token_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generating",
) -> Generations:
    """Greedy completions for every prompt (in input order)."""
    n = len(token_ids)
    completions: list[str | None] = [None] * n
    completion_ids: list[list[int] | None] = [None] * n
    first_logits: torch.Tensor | None = None
    eos = set(bundle.extra.get("eos_token_ids", []))
    batches = batches_by_length([len(r) for r in token_ids], batch_size)
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        batch = bundle.pad([token_ids[i] for i in idx]).to(bundle.device)
        with declare_roles(bundle, [len(token_ids[i]) for i in idx], batch.input_ids.shape[1]):
            out = _generate(bundle, batch, max_new_tokens, eos)
        new_tokens = out.sequences[:, batch.input_ids.shape[1]:].cpu()
        logits0 = out.logits[0].float().cpu()
        if first_logits is None:
            first_logits = torch.empty((n, logits0.shape[-1]), dtype=torch.float32)
        first_logits[torch.tensor(idx)] = logits0
        for row, i in enumerate(idx):
            ids = new_tokens[row].tolist()
            for j, tok in enumerate(ids):  # cut at the first end-of-turn token
                if tok in eos:
                    ids = ids[:j]
                    break
            completion_ids[i] = ids
            completions[i] = bundle.tokenizer.decode(ids, skip_special_tokens=True)
    return Generations(list(completions), list(completion_ids), first_logits)


def _generate(bundle: ModelBundle, batch, max_new_tokens: int, eos: set[int]):
    return bundle.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=bundle.pad_token_id,
        eos_token_id=sorted(eos) or None,
    )


class GenerationCache:
    """Generations on disk, keyed by weights hash, prompt tokens, length budget and the steering
    (``steer``: an intervention fingerprint; None for the unsteered model).

    Text goes to ``<key>.json``, first-step logits to the ``<key>.logits`` artifact (checksummed);
    anything unreadable or partial is regenerated, never trusted.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def get(self, bundle: ModelBundle, token_ids: Sequence[Sequence[int]], max_new_tokens: int,
            steer: str | None = None, **kwargs) -> Generations:
        """Cached generations, or generate now (call it with the intervention's hooks on when ``steer``)."""
        what = {"w": bundle.weights_hash, "t": [list(r) for r in token_ids], "m": max_new_tokens}
        key = sha256_json(what if steer is None else {**what, "steer": steer})[:24]
        text_path = self.root / bundle.name / f"{key}.json"
        logits_stem = self.root / bundle.name / f"{key}.logits"
        if text_path.exists() and artifact_exists(logits_stem):
            try:
                record = json.loads(text_path.read_text(encoding="utf-8"))
                tensors, _ = load_artifact(logits_stem, expect={"key": key})
                if record.get("key") == key and len(record["completions"]) == len(token_ids):
                    return Generations(record["completions"], record["completion_ids"], tensors["first_logits"])
            except (ArtifactError, ValueError, KeyError):
                pass
        gens = generate(bundle, token_ids, max_new_tokens=max_new_tokens, **kwargs)
        save_artifact(logits_stem, {"first_logits": gens.first_logits}, {"key": key})
        atomic_write_json(text_path, {"key": key, "completions": gens.completions, "completion_ids": gens.completion_ids})
        return gens
