"""Residual-stream activations at the post-instruction positions, batched and cached.

One forward pass of the base decoder (no vocab projection) per batch; a pre-hook on every
block and on the final norm copies only the last ``n_pos`` positions of each residual into a
preallocated output, so extraction costs about a plain forward pass. Prompts are tokenized
once and batched by length, and the chat-template prefix they all share runs once per batch
(its key/value cache continued by every row: same residuals to float tolerance, fewer tokens). Results are cached on disk in shards (safetensors + JSON with
checksums) keyed by weights hash, token ids, positions and dtype: a rerun after a crash
resumes from the completed shards, and a full hit never touches the model.

Readers stream: :meth:`ActivationCache.get` with ``layer``/``position`` reads only that slice of
each shard file, and :meth:`ActivationCache.mean` sums shard by shard, so memory holds the result
plus at most one shard (~850 MB for 64 prompts of a 70B model), never every layer of a split
(~3.4 GB per split there). Each shard's checksum is verified once per cache object (then remembered by its files' inode,
size and mtime), since it streams the whole file even when only a slice is read.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from tqdm.auto import tqdm

from refusal.artifacts import artifact_exists, artifact_paths, save_artifact, sha256_json, verify_artifact
from refusal.errors import ArtifactError, DataError
from refusal.models.architecture import decoder_of
from refusal.models.bundle import ModelBundle
from refusal.runtime.hooks import residual_input
from refusal.runtime.prefix import prompt_prefix_cache, shared_prefix
from refusal.runtime.roles import declare_roles

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


Index = tuple[int | slice, ...]


class ActivationCache:
    """Disk cache of :func:`extract_activations` results, sharded so interrupted runs resume and a
    reader holds one shard at a time (see :meth:`get` and :meth:`mean`)."""

    def __init__(self, root: str | Path, shard_size: int = SHARD_SIZE):
        self.root = Path(root)
        self.shard_size = shard_size
        self._verified: dict[Path, tuple] = {}  # shard stem -> its files' signature when the checksum last passed

    def key(self, bundle: ModelBundle, token_ids: Sequence[Sequence[int]], n_positions: int,
            steer: str | None = None) -> str:
        what = {
            "weights_hash": bundle.weights_hash,
            "token_ids": sha256_json([list(r) for r in token_ids]),
            "n_positions": n_positions,
            "dtype": str(bundle.dtype),
            "n_layers": bundle.n_layers,
            **bundle.numerics_key(),
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
        layer: int | None = None,
        position: int | None = None,
    ) -> Float[torch.Tensor, "n *sites_positions d_model"]:
        """Cached activations for these prompts; computes (and stores) only missing shards. With ``steer``
        (an intervention's fingerprint; call it with that intervention's hooks on) they are the steered
        residuals, cached apart from the unsteered ones.

        ``[n, n_layers + 1, n_positions, d_model]``, or with ``layer`` and/or ``position`` only that site
        and/or position (the axis dropped, as tensor indexing does): read from each shard's file as a
        slice, so memory holds the result plus at most one shard (extracted whole when missing).
        """
        index = (slice(None), slice(None) if layer is None else layer, slice(None) if position is None else position)
        full = (len(token_ids), bundle.n_layers + 1, n_positions, bundle.d_model)
        out = torch.empty(torch.empty(full, device="meta")[index].shape, dtype=torch.float32)  # IndexError before any work
        self._each_shard(bundle, token_ids, n_positions, index, lambda start, part: out[start : start + len(part)].copy_(part),
                         batch_size=batch_size, progress=progress, desc=desc, steer=steer)
        return out

    def mean(
        self,
        bundle: ModelBundle,
        token_ids: Sequence[Sequence[int]],
        n_positions: int,
        *,
        batch_size: int = 16,
        progress: bool = True,
        desc: str = "activations",
        steer: str | None = None,
    ) -> Float[torch.Tensor, "sites n_positions d_model"]:
        """Mean over the prompts of :meth:`get`'s tensor, summed shard by shard (float64 across shards)
        so it never holds more than one shard: what DiM needs at every layer and position."""
        total = torch.zeros((bundle.n_layers + 1, n_positions, bundle.d_model), dtype=torch.float64)
        # float32 sum within a shard: sum(dtype=float64) would first copy the whole shard to float64
        self._each_shard(bundle, token_ids, n_positions, (slice(None),), lambda _, part: total.add_(part.sum(0)),
                         batch_size=batch_size, progress=progress, desc=desc, steer=steer)
        return (total / len(token_ids)).float()

    def _each_shard(
        self,
        bundle: ModelBundle,
        token_ids: Sequence[Sequence[int]],
        n_positions: int,
        index: Index,
        use: Callable[[int, torch.Tensor], object],
        *,
        batch_size: int,
        progress: bool,
        desc: str,
        steer: str | None,
    ) -> None:
        """``use(start, shard[index])`` for each shard of rows in order: a valid shard is read as a slice,
        a missing or corrupt one is extracted and saved first. Nothing keeps a shard once ``use`` returns."""
        if not token_ids:
            raise DataError("no prompts to extract activations from; check the dataset sizes")
        key = self.key(bundle, token_ids, n_positions, steer)
        folder = self.root / bundle.name / key
        expect = {"key": key, **bundle.identity()}
        for start in range(0, len(token_ids), self.shard_size):
            rows = token_ids[start : start + self.shard_size]
            stem = folder / f"shard{start // self.shard_size:05d}"
            if self._valid(stem, expect, (len(rows), bundle.n_layers + 1, n_positions, bundle.d_model)):
                use(start, read_shard(stem, index))
                continue
            shard = extract_activations(
                bundle, rows, n_positions, batch_size=batch_size, progress=progress,
                desc=f"{desc} [{start}:{start + len(rows)}/{len(token_ids)}]",
            )
            save_artifact(stem, {"acts": shard}, {**expect, "start": start, "rows": len(rows)})
            use(start, shard[index])
            del shard  # before the next shard is extracted: one in memory at a time

    def _valid(self, stem: Path, expect: dict, shape: tuple[int, ...]) -> bool:
        """Whether a shard exists, matches ``expect`` and its checksum, and has ``shape``. The checksum reads
        the whole file, so it runs once per shard and cache object: again only if either file changed since
        (inode, size or mtime; a byte rewritten in place within the filesystem's clock tick would be missed)."""
        if not artifact_exists(stem):
            return False
        signature = tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in map(os.stat, artifact_paths(stem)))
        if self._verified.get(stem) == signature:
            return True
        try:
            tensor_path, _ = verify_artifact(stem, expect=expect)
        except ArtifactError as err:
            warnings.warn(f"ignoring activation cache shard: {err}; recomputing it", stacklevel=4)
            return False
        with safe_open(tensor_path, "pt") as fh:
            found = tuple(fh.get_slice("acts").get_shape()) if "acts" in fh.keys() else None
        if found != shape:
            warnings.warn(f"activation cache shard {stem} has the wrong shape; recomputing it", stacklevel=4)
            return False
        self._verified[stem] = signature
        return True


def read_shard(stem: Path, index: Index) -> torch.Tensor:
    """``acts[index]`` of a verified shard, read as a slice: safetensors maps the file and copies nothing
    (safetensors 0.8: a view of the mapping), so the rest of the shard stays in the page cache, not in memory."""
    with safe_open(artifact_paths(stem)[0], "pt") as fh:
        return fh.get_slice("acts")[index]
