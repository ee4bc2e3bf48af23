"""Atomic, pickle-free artifacts: safetensors for tensors, JSON for metadata.

An artifact is a pair ``<stem>.safetensors`` + ``<stem>.json``. The JSON records the SHA-256
of the tensor file and a SHA-256 of its own content, so a truncated, corrupt or hand-edited file
(tensors or metadata: a ``"layer"`` changed from 1 to 2) is detected on load instead of being used,
and metadata (model, weights hash, data hash, layer...) is checked against what the caller
expects, so an artifact fitted for another model is refused with a message saying which.
Both files are written to a temporary name and renamed, so a killed run never leaves a
half-written file that a rerun would trust; the temp names carry the writer's pid and host, so
the next write into a folder removes what a killed writer left there (:func:`clean_stale_temps`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from refusal.errors import ArtifactMismatchError, CorruptArtifactError

#: 2: the JSON carries ``record_sha256`` over its own content. Version 1 (no metadata checksum) is stale: refit.
FORMAT_VERSION = 2
#: A temp entry whose writer is dead (on this host) is removed once untouched this long: a grace
#: for a writer in another pid namespace that happens to share the host name.
DEAD_WRITER_GRACE_S = 600.0
#: Any other temp entry (a live pid that may be a reused one, another host, an old-style name).
STALE_TEMP_AGE_S = 24 * 3600.0


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


def file_mode() -> int:
    """The mode a file the user creates gets (0666 minus the umask): what our files get too."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a folder the user creates gets (0777 minus the umask), not mkdtemp's private 0700."""
    return 0o777 & ~_umask()


def shown_path(path: str | Path) -> str:
    """``path`` as a record or report shows it: relative to the working directory when inside it, so a report
    written in one checkout or worktree reads the same in another; otherwise as given."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def file_signature(path: str | Path) -> tuple[int, int, int]:
    """(inode, size, mtime_ns): changes when a file is replaced or rewritten, so a checksum that
    passed for one signature need not be recomputed until it changes."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_prefix(name: str) -> str:
    """Prefix of a temp entry for ``name``: ``.<name>.<pid>@<host>.`` (mkstemp/mkdtemp add a random
    part and the ``.tmp`` suffix), so :func:`clean_stale_temps` can tell whether its writer is alive."""
    return f".{name}.{os.getpid()}@{_host()}."


_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_touched(path: Path) -> float:
    """Newest mtime of an entry and, for a folder, of what lies directly in it (a writer filling it)."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        with os.scandir(path) as entries:
            times += [e.stat(follow_symlinks=False).st_mtime for e in entries]
    return max(times)


def is_stale_temp(path: Path, now: float | None = None, legacy: re.Pattern[str] | None = None) -> bool:
    """Whether a hidden temp entry (``.*.tmp``, or a name ``legacy`` matches) was left by a writer
    that can no longer finish it.

    Stale: its writer's pid (in the name) is dead on this host and it was untouched for
    :data:`DEAD_WRITER_GRACE_S`; or it was untouched for :data:`STALE_TEMP_AGE_S` whoever wrote it
    (another host, a reused pid, an old-style name). A concurrent job's entry is never stale.
    """
    name = path.name
    if not name.startswith(".") or not (name.endswith(".tmp") or (legacy is not None and legacy.fullmatch(name))):
        return False
    age = (time.time() if now is None else now) - _last_touched(path)
    match = _TEMP.match(name)
    if match and match["host"] == _host() and not _pid_alive(int(match["pid"])):
        return age > DEAD_WRITER_GRACE_S
    return age > STALE_TEMP_AGE_S


def clean_stale_temps(folder: str | Path, legacy: re.Pattern[str] | None = None) -> list[Path]:
    """Remove the stale temp entries (:func:`is_stale_temp`) in ``folder``; returns what was removed.

    Called before each write into a folder, so a killed run's leftovers (a ``.tmp`` file, a ~GB
    staging folder) do not stay forever. ``legacy`` matches temp names of older versions (no pid).
    Never raises: cleaning is best effort.
    """
    removed = []
    try:
        entries = [Path(e.path) for e in os.scandir(folder) if e.name.startswith(".")]
    except OSError:
        return removed
    for entry in entries:
        try:
            if not is_stale_temp(entry, legacy=legacy):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:  # gone already (another cleaner), or not ours to remove
            continue
    return removed


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it is renamed to ``path``, else deleted.

    A killed run never leaves a half-written file under the real name, and the next write into the
    folder removes its stale temp file. The file gets the mode any file the user creates gets (0666
    minus the umask), not mkstemp's private 0600, so results and artifacts are readable by
    collaborators like the user's other files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())
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


def _record_sha256(record: Mapping[str, Any]) -> str:
    """Checksum of an artifact's JSON record, all of it but the checksum itself."""
    return sha256_json({k: v for k, v in record.items() if k != "record_sha256"})


def save_artifact(stem: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Save tensors + metadata. The JSON (written last) is the commit marker and is checksummed too."""
    tensor_path, meta_path = artifact_paths(stem)
    atomic_save_safetensors(tensor_path, tensors)
    record = {
        "format_version": FORMAT_VERSION,
        "tensor_file": tensor_path.name,
        "tensor_sha256": sha256_file(tensor_path),
        "tensor_bytes": tensor_path.stat().st_size,
        # as it reads back (tuples become lists, keys strings), so the checksum is of what a load sees
        "meta": json.loads(json.dumps(dict(meta), ensure_ascii=False)),
    }
    record["record_sha256"] = _record_sha256(record)
    atomic_write_json(meta_path, record)


def artifact_exists(stem: str | Path) -> bool:
    tensor_path, meta_path = artifact_paths(stem)
    return tensor_path.exists() and meta_path.exists()


def load_artifact(
    stem: str | Path, expect: Mapping[str, Any] | None = None, keys: Iterable[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify an artifact (see :func:`verify_artifact` for what is checked).

    ``keys``: read only these tensors (those absent are left out; the caller says what is missing),
    so a tensor an older format also stored is never materialised.
    """
    tensor_path, meta = verify_artifact(stem, expect)
    if keys is None:
        return load_file(tensor_path), meta
    with safe_open(str(tensor_path), framework="pt") as fh:
        present = set(fh.keys())
        return {key: fh.get_tensor(key) for key in keys if key in present}, meta


def verify_artifact(stem: str | Path, expect: Mapping[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Check an artifact without loading its tensors: returns the tensor file and the metadata.

    Raises :class:`ArtifactError` when a file is missing, a checksum does not match (tensors or
    metadata truncated, corrupt or edited), the metadata predates its checksum (format 1: stale) or
    a metadata key differs from ``expect`` (fitted for another model, layer, data...: the only case
    raised as :class:`ArtifactMismatchError`; every other one means "refit it").
    The checksum streams the file, so a caller can then read only a slice of it.
    """
    tensor_path, meta_path = artifact_paths(stem)
    if not meta_path.exists() or not tensor_path.exists():
        raise CorruptArtifactError(f"artifact {stem} is incomplete (missing {meta_path.name} or {tensor_path.name})", "refit it")
    record, meta, expected_sha = _read_record(meta_path)
    if tensor_path.stat().st_size != record.get("tensor_bytes") or sha256_file(tensor_path) != expected_sha:
        raise CorruptArtifactError(f"artifact {tensor_path} does not match its recorded checksum (truncated or corrupt)")
    if expect:
        check_meta(meta, expect, str(stem))
    return tensor_path, meta


def _read_record(meta_path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(record, meta, tensor SHA-256) of an artifact's JSON, after its own checksum passed."""
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        meta, expected_sha = record["meta"], record["tensor_sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CorruptArtifactError(f"artifact metadata {meta_path} is corrupt ({err})") from err
    if record.get("format_version") != FORMAT_VERSION or "record_sha256" not in record:
        raise CorruptArtifactError(
            f"artifact metadata {meta_path} is stale: format {record.get('format_version')!r} of an older refusal, "
            f"without a checksum of its own (format {FORMAT_VERSION} has one)"
        )
    if record["record_sha256"] != _record_sha256(record) or not isinstance(meta, dict):
        raise CorruptArtifactError(f"artifact metadata {meta_path} does not match its recorded checksum (edited or corrupt)")
    return record, meta, expected_sha


def check_meta(meta: Mapping[str, Any], expect: Mapping[str, Any], what: str) -> None:
    """Refuse an artifact whose metadata differs from what the caller needs, naming the keys."""
    mismatches = [
        f"{key}: artifact has {meta.get(key)!r}, this run needs {value!r}"
        for key, value in expect.items()
        if meta.get(key) != value
    ]
    if mismatches:
        raise ArtifactMismatchError(
            f"artifact {what} was made for something else ({'; '.join(mismatches)}). "
            "Point artifacts_dir elsewhere or delete it to refit."
        )
