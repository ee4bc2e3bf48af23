"""Batched greedy generation with left padding and KV cache, plus its disk cache.

Prompts are batched by length; the first step's raw logits come back with the text, so the
first-token refusal score needs no extra forward pass. A decoding step reads every weight once
whatever the batch, so on a CPU it is bandwidth-bound: the cache generates the missing entries
of several prompt sets (harmful, harmless, a test set) in one call, in full batches. The
unsteered model's generations are cached (they are the baseline of every run and the text that
perplexity is measured on), and so are steered ones, keyed by the intervention's fingerprint
(its code, config, scope and fitted tensors), so rerunning a comparison regenerates nothing. Until a
call's whole result is saved, each finished batch is kept on its own (:class:`BatchJournal`): a run
killed an hour into a generation resumes at the batch it was in.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from refusal.artifacts import artifact_exists, atomic_write_json, load_artifact, save_artifact, sha256_json
from refusal.errors import ArtifactError
from refusal.models.bundle import Batch, ModelBundle
from refusal.runtime.activations import batches_by_length
from refusal.runtime.decoding import DECODING_ATTENTION, greedy_decode
from refusal.runtime.prefix import prompt_prefix_cache, shared_prefix
from refusal.runtime.roles import declare_roles

ENGINES = ("refusal", "transformers")
#: A journal untouched this long belongs to a run nobody resumed (a changed config keys a new one): it is removed
#: when a generation of the same model starts, so killed runs do not leave hundreds of MB behind for ever.
STALE_JOURNAL_DAYS = 14

log = logging.getLogger(__name__)


@dataclass
class Generations:
    completions: list[str]
    completion_ids: list[list[int]]
    first_logits: torch.Tensor  # [n, vocab] float32, raw logits of the first generated token


@torch.inference_mode()
@sdpa_kernel(DECODING_ATTENTION)  # the shared prefix's prefill and either engine: see refusal.runtime.decoding
def generate(
    bundle: ModelBundle,
    token_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generating",
    share_prefix: bool = True,
    engine: str = "refusal",
    stop: Collection[int] = (),
    journal: BatchJournal | None = None,
) -> Generations:
    """Greedy completions for every prompt (in input order).

    The chat-template prefix all prompts share is prefilled once per batch and every row continues
    from its cache (padding then sits between the prefix and the row's own tokens, which the
    attention mask and positions skip): the same greedy decoding on fewer prefill tokens.
    ``engine``: ``refusal`` (:func:`refusal.runtime.decoding.greedy_decode`) or ``transformers`` (``generate``, the
    reference it is tested against). ``stop``: token ids that also end a row, kept as its last token (a judge's
    line of reasoning ends at its newline; an end-of-turn token is cut off). ``journal``: where each finished batch is
    kept, so a killed call redoes only the batch it was in (the batches are a function of the rows and batch size).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    n = len(token_ids)
    completions: list[str | None] = [None] * n
    completion_ids: list[list[int] | None] = [None] * n
    first_logits: torch.Tensor | None = None
    eos = set(bundle.extra.get("eos_token_ids", []))
    ends = eos | set(stop)
    prefix = shared_prefix(token_ids, len(bundle.post_instruction_ids)) if share_prefix else []
    batches = batches_by_length([len(r) for r in token_ids], batch_size)
    for b, idx in enumerate(tqdm(batches, desc=desc, disable=not progress, unit="batch")):
        done = journal.load(b, len(idx)) if journal is not None else None
        if done is None:
            done = _decode_batch(bundle, [token_ids[i][len(prefix):] for i in idx], prefix, max_new_tokens, eos, ends, engine)
            if journal is not None:
                journal.save(b, *done)
        rows_ids, logits0 = done
        if first_logits is None:
            first_logits = torch.empty((n, logits0.shape[-1]), dtype=torch.float32)
        first_logits[torch.tensor(idx)] = logits0
        for i, ids in zip(idx, rows_ids, strict=True):
            completion_ids[i], completions[i] = ids, bundle.tokenizer.decode(ids, skip_special_tokens=True)
    return Generations(list(completions), list(completion_ids), first_logits)


def _decode_batch(bundle: ModelBundle, rows: list[Sequence[int]], prefix: Sequence[int], max_new_tokens: int,
                  eos: set[int], ends: set[int], engine: str) -> tuple[list[list[int]], torch.Tensor]:
    """One batch's new token ids per row (cut at the first end-of-turn token, or after the first stop token) and
    its first-step logits (float32, on the CPU)."""
    batch = bundle.pad(rows).to(bundle.device)
    past = prompt_prefix_cache(bundle, prefix, len(rows)) if prefix else None
    with declare_roles(bundle, [len(r) for r in rows], batch.input_ids.shape[1]):
        if engine == "refusal":
            new_tokens, logits0 = greedy_decode(bundle, batch.input_ids, batch.attention_mask, batch.position_ids,
                                                max_new_tokens, ends, past=past, offset=len(prefix))
        else:
            new_tokens, logits0 = _generate(bundle, prefix, batch, past, max_new_tokens, ends)
    out = []
    for ids in new_tokens.cpu().tolist():
        for j, tok in enumerate(ids):
            if tok in ends:
                ids = ids[:j] if tok in eos else ids[: j + 1]
                break
        out.append(ids)
    return out, logits0.float().cpu()


class BatchJournal:
    """One :func:`generate` call's finished batches on disk (their token ids and first-step logits, checksummed), so a
    killed run redoes only the batch it was in. Its owner keys the folder by everything that decides the batches'
    output (weights, numerics, prompts, budget, steering, batch size) and removes it once the whole result is saved."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _stem(self, index: int) -> Path:
        return self.folder / f"batch{index:05d}"

    def load(self, index: int, rows: int) -> tuple[list[list[int]], torch.Tensor] | None:
        """Batch ``index`` as it was saved, or None (never written, half written, corrupt, of another size, or removed
        while read by a concurrent job with the same work that finished first)."""
        try:
            if not artifact_exists(self._stem(index)):
                return None
            tensors, meta = load_artifact(self._stem(index), expect={"batch": index})
        except (ArtifactError, OSError):
            return None
        ids, logits = meta.get("completion_ids"), tensors.get("first_logits")
        return (ids, logits) if isinstance(ids, list) and len(ids) == rows and logits is not None and len(logits) == rows else None

    def save(self, index: int, completion_ids: list[list[int]], first_logits: torch.Tensor) -> None:
        """Keep batch ``index``; best effort, since the journal only saves a resumed run work: a concurrent job with
        the same work (a multirun's jobs share the unsteered generations) removes the folder when it finishes, and a
        write that loses that race must not fail this job, whose result is in memory."""
        try:
            save_artifact(self._stem(index), {"first_logits": first_logits}, {"batch": index, "completion_ids": completion_ids})
        except OSError as err:
            log.info("generation journal: batch %d not kept (%s); only a resume of this run would miss it", index, err)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def remove_stale_siblings(self, days: float = STALE_JOURNAL_DAYS) -> None:
        """Remove the other journals beside this one whose newest file is older than ``days`` (logged)."""
        if not self.folder.parent.is_dir():
            return
        cutoff = time.time() - days * 86400
        for other in self.folder.parent.iterdir():
            if other == self.folder or not other.is_dir():
                continue
            try:  # a concurrent job may remove its own journal, or a file in it, while this one reads it
                stats = [p.stat() for p in other.rglob("*") if p.is_file()]
            except OSError:
                continue
            if stats and max(st.st_mtime for st in stats) < cutoff:
                shutil.rmtree(other, ignore_errors=True)
                log.info("removed a generation journal untouched for %g+ days (%s, %.0f MB): its run was never resumed",
                         days, other, sum(st.st_size for st in stats) / 1e6)


def truncated(gens: Generations, max_new_tokens: int, tokenizer: Any) -> Generations:
    """Each completion cut to its first ``max_new_tokens`` tokens: greedy decoding at that budget, read off a longer
    generation (the same tokens in exact arithmetic), so one generation serves every shorter budget of a length curve."""
    ids = [row[:max_new_tokens] for row in gens.completion_ids]
    texts = [text if len(row) <= max_new_tokens else tokenizer.decode(cut, skip_special_tokens=True)
             for text, row, cut in zip(gens.completions, gens.completion_ids, ids, strict=True)]
    return Generations(texts, ids, gens.first_logits)


class _FirstLogits(LogitsProcessor):
    """Keeps the first step's logits (greedy decoding has no other processor before this one), so
    the other steps' ``[batch, vocab]`` logits are never stored, as ``output_logits`` would."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            self.logits = scores.clone()
        return scores


def _generate(bundle: ModelBundle, prefix: Sequence[int], batch: Batch, past: Any, max_new_tokens: int,
              eos: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens, first-step logits) of one padded batch by ``transformers``' ``generate``, continuing
    ``past`` (the cache of ``prefix``)."""
    n = batch.input_ids.shape[0]
    input_ids = torch.cat([torch.tensor([list(prefix)] * n, dtype=torch.long, device=bundle.device).view(n, -1),
                           batch.input_ids], dim=1)
    mask = torch.cat([batch.attention_mask.new_ones(n, len(prefix)), batch.attention_mask], dim=1)
    first = _FirstLogits()
    sequences = bundle.model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        cache=past,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=1.0,  # pure greedy, whatever the checkpoint's generation_config asks
        logits_processor=LogitsProcessorList([first]),
        pad_token_id=bundle.pad_token_id,
        eos_token_id=sorted(eos) or None,
    )
    return sequences[:, input_ids.shape[1]:], first.logits


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
        return self.get_many(bundle, {"": token_ids}, max_new_tokens, steer, **kwargs)[""]

    def get_many(self, bundle: ModelBundle, sets: Mapping[str, Sequence[Sequence[int]]], max_new_tokens: int,
                 steer: str | None = None, **kwargs) -> dict[str, Generations]:
        """Generations of several named prompt sets, each cached on its own; the missing ones are
        generated together in one call, so their decoding steps share batches."""
        keys = {name: self._key(bundle, rows, max_new_tokens, steer) for name, rows in sets.items()}
        out = {name: hit for name, rows in sets.items() if (hit := self._load(bundle, keys[name], len(rows))) is not None}
        missing = [name for name in sets if name not in out]
        if missing:
            rows = [row for name in missing for row in sets[name]]
            batching = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in kwargs.items()
                        if k not in ("progress", "desc")}  # what decides the batches and their output
            journal = BatchJournal(self.root / bundle.name / "partial" /
                                   sha256_json({"sets": [keys[name] for name in missing], **batching})[:24])
            journal.remove_stale_siblings()
            gens = generate(bundle, rows, max_new_tokens=max_new_tokens, journal=journal, **kwargs)
            start = 0
            for name in missing:
                part = slice(start, start + len(sets[name]))
                start = part.stop
                out[name] = Generations(gens.completions[part], gens.completion_ids[part], gens.first_logits[part].clone())
                self._save(bundle, keys[name], out[name])
            journal.remove()
        return {name: out[name] for name in sets}

    @staticmethod
    def _key(bundle: ModelBundle, token_ids: Sequence[Sequence[int]], max_new_tokens: int, steer: str | None) -> str:
        what = {"w": bundle.weights_hash, "t": [list(r) for r in token_ids], "m": max_new_tokens, **bundle.numerics_key()}
        return sha256_json(what if steer is None else {**what, "steer": steer})[:24]

    def _paths(self, bundle: ModelBundle, key: str) -> tuple[Path, Path]:
        return self.root / bundle.name / f"{key}.json", self.root / bundle.name / f"{key}.logits"

    def _load(self, bundle: ModelBundle, key: str, n: int) -> Generations | None:
        text_path, logits_stem = self._paths(bundle, key)
        if not (text_path.exists() and artifact_exists(logits_stem)):
            return None
        try:
            record = json.loads(text_path.read_text(encoding="utf-8"))
            tensors, _ = load_artifact(logits_stem, expect={"key": key})
            if record.get("key") == key and len(record["completions"]) == n:
                return Generations(record["completions"], record["completion_ids"], tensors["first_logits"])
        except (ArtifactError, ValueError, KeyError):
            pass
        return None

    def _save(self, bundle: ModelBundle, key: str, gens: Generations) -> None:
        text_path, logits_stem = self._paths(bundle, key)
        save_artifact(logits_stem, {"first_logits": gens.first_logits}, {"key": key})
        atomic_write_json(text_path, {"key": key, "completions": gens.completions, "completion_ids": gens.completion_ids})
