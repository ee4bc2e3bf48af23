"""A run folder's per-prompt record, ``completions.jsonl``: written plain by a run, gzipped when a study folder is
archived for a repository (a fifth of the size: the study's 44 MB of completions would otherwise push a checkout
past what a lent GPU machine accepts, 64 MiB). Readers take either."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from refusal.artifacts import atomic_write_bytes

COMPLETIONS = "completions.jsonl"
ARCHIVED = COMPLETIONS + ".gz"


def completions_path(run_dir: str | Path) -> Path | None:
    """The run's completions file, plain or archived; None when it has neither."""
    for name in (COMPLETIONS, ARCHIVED):
        if (path := Path(run_dir) / name).exists():
            return path
    return None


def completions_text(run_dir: str | Path) -> str:
    """The run's completions file as text (plain or archived)."""
    path = completions_path(run_dir)
    if path is None:
        raise FileNotFoundError(f"{Path(run_dir) / COMPLETIONS} not found (nor {ARCHIVED})")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8")


def read_completions(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every row of the run's completions file (plain or archived)."""
    return [json.loads(line) for line in completions_text(run_dir).splitlines() if line]


def archive_completions(root: str | Path) -> int:
    """Gzip every plain completions file under ``root`` in place (byte-reproducible: no name or time in the
    header, so an unchanged file archives to the same bytes); returns how many."""
    count = 0
    for plain in sorted(Path(root).rglob(COMPLETIONS)):
        atomic_write_bytes(plain.with_name(ARCHIVED), gzip.compress(plain.read_bytes(), compresslevel=9, mtime=0))
        plain.unlink()
        count += 1
    return count
