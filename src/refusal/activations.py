"""Residual-stream activations at the post-instruction positions, batched and cached.

One forward pass of the base decoder (no vocab projection) per batch; a pre-hook on every
block and on the final norm copies only the last ``n_pos`` positions of each residual into a
preallocated output, so extraction costs about a plain forward pass. Prompts are tokenized
once and batched by length, and the chat-template prefix they all share runs once per batch
(its key/value cache continued by every row: same residuals to float tolerance, fewer tokens). Results are cached on disk in shards (safetensors + JSON with
checksums) keyed by weights hash, token ids, positions and dtype: a rerun after a crash
resumes from the completed shards, and a full hit never touches the model.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal.artifacts import artifact_exists, load_artifact, save_artifact, sha256_json
from refusal.errors import ArtifactError, DataError
from refusal.hooks import residual_input
from refusal.interventions.scope import declare_roles
from refusal.models.architecture import decoder_of
from refusal.models.bundle import ModelBundle
from refusal.prefix import prompt_prefix_cache, shared_prefix

log = logging.getLogger(__name__)

SHARD_SIZE = 64


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding, same results)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def extract_activations(
    bundle: ModelBundle,
    token_ids: Sequence[Sequence[int]],
    n_positions: int,
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "activations",
    share_prefix: bool = True,
) -> torch.Tensor:
    """Residuals at the last ``n_positions`` tokens of every prompt, for every layer.

    Returns float32 ``[n_prompts, n_layers + 1, n_positions, d_model]`` on CPU: index ``l < n_layers``
    is the input of block ``l``; index ``n_layers`` is the last block's output (the final norm's input).
    """
    if not token_ids:
        raise DataError("no prompts to extract activations from; check the dataset sizes")
    if min(len(r) for r in token_ids) < n_positions:
        raise DataError(f"a prompt is shorter than the {n_positions} positions requested")
    layout = bundle.layout
    n_sites = layout.n_layers + 1
    out = torch.empty((len(token_ids), n_sites, n_positions, bundle.d_model), dtype=torch.float32)
    current: dict[str, torch.Tensor | None] = {"buf": None}

    def capture(site: int):
        def hook(module, args, kwargs):
            if current["buf"] is not None:  # None while the shared prefix runs
                current["buf"][:, site] = residual_input(args, kwargs)[:, -n_positions:, :]

        return hook

    handles = [
        module.register_forward_pre_hook(capture(site), with_kwargs=True)
        for site, module in enumerate([*layout.blocks, layout.final_norm])
    ]
    decoder = decoder_of(bundle.model)
    try:
        batches = batches_by_length([len(r) for r in token_ids], batch_size)
        prefix = shared_prefix(token_ids, max(n_positions, len(bundle.post_instruction_ids))) if share_prefix else []
        n_prefix = len(prefix)
        for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            past = prompt_prefix_cache(bundle, prefix, len(idx)) if prefix else None
            rows = [token_ids[i][n_prefix:] for i in idx]
            batch = bundle.pad(rows).to(bundle.device)
            mask = torch.cat([batch.attention_mask.new_ones(len(idx), n_prefix), batch.attention_mask], dim=1)
            current["buf"] = torch.empty(
                (len(idx), n_sites, n_positions, bundle.d_model), dtype=bundle.dtype, device=bundle.device
            )
            with declare_roles(bundle, [len(r) for r in rows], batch.input_ids.shape[1]):
                decoder(
                    input_ids=batch.input_ids,
                    attention_mask=mask,
                    position_ids=batch.position_ids + n_prefix,
                    cache=past,
                    use_cache=past is not None,
                )
            out[torch.tensor(idx)] = current["buf"].float().cpu()
            current["buf"] = None
    finally:
        for handle in handles:
            handle.remove()
    if not torch.isfinite(out).all():
        raise DataError(
            f"{bundle.name} produced NaN/Inf activations; try model.dtype=float32 or check the checkpoint"
        )
    return out


class ActivationCache:
    """Disk cache of :func:`extract_activations` results, sharded so interrupted runs resume."""

    def __init__(self, root: str | Path, shard_size: int = SHARD_SIZE):
        self.root = Path(root)
        self.shard_size = shard_size

    def key(self, bundle: ModelBundle, token_ids: Sequence[Sequence[int]], n_positions: int,
            steer: str | None = None) -> str:
        what = {
            "weights_hash": bundle.weights_hash,
            "token_ids": sha256_json([list(r) for r in token_ids]),
            "n_positions": n_positions,
            "dtype": str(bundle.dtype),
            "n_layers": bundle.n_layers,
        }
        return sha256_json(what if steer is None else {**what, "steer": steer})[:24]

    def get(
        self,
        bundle: ModelBundle,
        token_ids: Sequence[Sequence[int]],
        n_positions: int,
        *,
        batch_size: int = 16,
        progress: bool = True,
        desc: str = "activations",
        steer: str | None = None,
    ) -> torch.Tensor:
        """Cached activations for these prompts; computes (and stores) only missing shards. With ``steer``
        (an intervention's fingerprint; call it with that intervention's hooks on) they are the steered
        residuals, cached apart from the unsteered ones."""
        key = self.key(bundle, token_ids, n_positions, steer)
        folder = self.root / bundle.name / key
        expect = {"key": key, **bundle.identity()}
        shards = []
        for start in range(0, len(token_ids), self.shard_size):
            rows = token_ids[start : start + self.shard_size]
            stem = folder / f"shard{start // self.shard_size:05d}"
            shard = self._load(stem, expect, len(rows))
            if shard is None:
                shard = extract_activations(
                    bundle, rows, n_positions, batch_size=batch_size, progress=progress,
                    desc=f"{desc} [{start}:{start + len(rows)}/{len(token_ids)}]",
                )
                save_artifact(stem, {"acts": shard}, {**expect, "start": start, "rows": len(rows)})
            shards.append(shard)
        return torch.cat(shards)

    @staticmethod
    def _load(stem: Path, expect: dict, rows: int) -> torch.Tensor | None:
        if not artifact_exists(stem):
            return None
        try:
            tensors, meta = load_artifact(stem, expect=expect)
        except ArtifactError as err:
            warnings.warn(f"ignoring activation cache shard: {err}; recomputing it", stacklevel=3)
            return None
        acts = tensors.get("acts")
        if acts is None or acts.shape[0] != rows:
            warnings.warn(f"activation cache shard {stem} has the wrong shape; recomputing it", stacklevel=3)
            return None
        return acts
