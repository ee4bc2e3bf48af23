"""Atomic, pickle-free artifacts: safetensors for tensors, JSON for metadata.

An artifact is a pair ``<stem>.safetensors`` + ``<stem>.json``. The JSON records the SHA-256
of the tensor file, so a truncated or corrupt file is detected on load instead of being used,
and metadata (model, weights hash, data hash, layer...) is checked against what the caller
expects, so an artifact fitted for another model is refused with a message saying which.
Both files are written to a temporary name and renamed, so a killed run never leaves a
half-written file that a rerun would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refusal.errors import ArtifactError

FORMAT_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it is renamed to ``path``, else deleted.

    A killed run never leaves a half-written file under the real name. The file gets the mode any
    file the user creates gets (0666 minus the umask), not mkstemp's private 0600, so results and
    artifacts are readable by collaborators like the user's other files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and an atomic rename."""
    with atomic_target(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """safetensors.save_file to a temp name, then rename."""
    with atomic_target(path) as tmp:
        # clone: views of one storage (a direction sliced from its candidates) cannot be saved as such
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp))


def artifact_paths(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_artifact(stem: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Save tensors + metadata. The JSON (written last) is the commit marker."""
    tensor_path, meta_path = artifact_paths(stem)
    atomic_save_safetensors(tensor_path, tensors)
    record = {
        "format_version": FORMAT_VERSION,
        "tensor_file": tensor_path.name,
        "tensor_sha256": sha256_file(tensor_path),
        "tensor_bytes": tensor_path.stat().st_size,
        "meta": dict(meta),
    }
    atomic_write_json(meta_path, record)


def artifact_exists(stem: str | Path) -> bool:
    tensor_path, meta_path = artifact_paths(stem)
    return tensor_path.exists() and meta_path.exists()


def load_artifact(
    stem: str | Path, expect: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify an artifact (see :func:`verify_artifact` for what is checked)."""
    tensor_path, meta = verify_artifact(stem, expect)
    return load_file(tensor_path), meta


def verify_artifact(stem: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Check an artifact without loading its tensors: returns the tensor file and the metadata.

    Raises :class:`ArtifactError` when a file is missing, the checksum does not match (truncated
    or corrupt) or a metadata key differs from ``expect`` (fitted for another model, layer, data...).
    The checksum streams the file, so a caller can then read only a slice of it.
    """
    tensor_path, meta_path = artifact_paths(stem)
    if not meta_path.exists() or not tensor_path.exists():
        raise ArtifactError(f"artifact {stem} is incomplete (missing {meta_path.name} or {tensor_path.name}); refit it")
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        meta = record["meta"]
        expected_sha = record["tensor_sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(f"artifact metadata {meta_path} is corrupt ({err}); delete it to refit") from err
    if tensor_path.stat().st_size != record.get("tensor_bytes") or sha256_file(tensor_path) != expected_sha:
        raise ArtifactError(
            f"artifact {tensor_path} does not match its recorded checksum (truncated or corrupt); delete it to refit"
        )
    if expect:
        check_meta(meta, expect, str(stem))
    return tensor_path, meta


def check_meta(meta: Mapping[str, Any], expect: Mapping[str, Any], what: str) -> None:
    """Refuse an artifact whose metadata differs from what the caller needs, naming the keys."""
    mismatches = [
        f"{key}: artifact has {meta.get(key)!r}, this run needs {value!r}"
        for key, value in expect.items()
        if meta.get(key) != value
    ]
    if mismatches:
        raise ArtifactError(
            f"artifact {what} was made for something else ({'; '.join(mismatches)}). "
            "Point artifacts_dir elsewhere or delete it to refit."
        )
