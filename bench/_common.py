"""Shared plumbing for the bench scripts: CLI flags, model loading, timing, host info, CSV rows.

CSV convention (one file per bench, ``bench/results/<name>.csv``, ``<name>`` = script stem without
``bench_``): one appended row per run; the metadata columns of :data:`META_COLUMNS` come first, then
the bench's figures (seconds end in ``_s``, ratios in ``_ratio``, memory in ``_mb``). A run that adds
a column rewrites the header with the union, so older rows stay readable. ``bench/run_all.py``
renders the latest row per (bench, model) into ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SMOKE_MODEL = "tiny"

# Targets from the "Benchmarks" issue, shared by the scripts and the docs generator.
TARGETS: dict[str, Any] = {
    "extraction": 1.10, "hooks": 1.03, "selection": 0.5,
    "first_command": {"cold_dequant": 600.0, "warm": 120.0},  # seconds on 2 CPU cores (issue 17)
    "generation": 4.0,  # greedy tokens/s vs transformers' generate in float32 at 64 rows, same budget (issue 24)
    "trial": 32.0,  # s per lean search trial, 32 + 32 prompts, 32 tokens: heretic's time at those settings (its defaults: 100+100, 100 tokens)
}

META_COLUMNS = [
    "timestamp", "bench", "model", "smoke", "command", "host", "cpu", "cpu_count", "torch_threads",
    "loadavg_1m", "torch", "transformers", "device", "gpu",
]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every bench takes, so run_all.py and gpu_check.sh can drive them alike."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="qwen05", help="conf/model/<name>.yaml (default qwen05; tiny for smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few prompts: checks the script in seconds")
    parser.add_argument("--device", default=None, help="override model.device (cpu, cuda); default: the config's (auto)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats after one warm-up; the median is reported (default 3; smoke 5)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where <name>.csv is appended")
    parser.add_argument("--no-csv", action="store_true", help="print only, append nothing")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and apply --smoke (forces the tiny model)."""
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = SMOKE_MODEL
    if args.repeats is None:
        args.repeats = 5 if args.smoke else 3
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def cache_dir() -> Path:
    """The same cache evaluate.py uses (REFUSAL_CACHE or ~/.cache/refusal), so dequantized weights are reused."""
    return Path(os.environ.get("REFUSAL_CACHE") or Path(os.environ.get("HOME", ".")) / ".cache" / "refusal")


def model_config(name: str, device: str | None = None) -> dict[str, Any]:
    """``conf/model/<name>.yaml`` as a dict, with an optional device override."""
    import yaml

    path = REPO / "conf" / "model" / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml")))
        raise SystemExit(f"unknown model {name!r}: no {path}; known: {known}")
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("defaults", None)  # the schema's entry (refusal.schema), for Hydra only
    if device:
        cfg["device"] = device
    return cfg


def load_bundle(name: str, device: str | None = None):
    """Load a model the way the pipeline does (from the shared cache)."""
    from refusal.models import load_model

    return load_model(model_config(name, device), cache_dir())


def embedded_splits(n_train: int = 64, n_val: int = 24, n_test: int = 48):
    """The packaged prompts (offline), same seed as the default config."""
    from refusal.data import load_splits

    return load_splits({"name": "embedded", "seed": 0, "n_train": n_train, "n_val": n_val, "n_test": n_test})


def mixed_instructions(n: int) -> list[str]:
    """``n`` embedded training instructions, harmful and harmless in turn (a batch like the study's)."""
    splits = embedded_splits(n_train=max(8, n // 2 + 1), n_val=8, n_test=8)
    return [x for pair in zip(splits.harmful_train, splits.harmless_train, strict=True) for x in pair][:n]


def sync(device: Any) -> None:
    """Wait for queued GPU work so wall times cover it."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Any) -> float:
    """Seconds one call of ``fn`` takes, GPU work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: Mapping[str, Callable[[], Any]], device: Any, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function ``repeats`` times in interleaved rounds (after ``warmup`` untimed rounds).

    Round r runs the functions in their given order rotated by r, so slow drift from other load on
    the machine (or thermal state) spreads over every variant instead of biasing one.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(fns[name], device))
    return times


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def ru_maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    raw = resource.getrusage(who).ru_maxrss
    return raw / (1 << 20) if sys.platform == "darwin" else raw / 1024


def peak_memory(device: Any) -> dict[str, float | str]:
    """Peak RSS of this process and, on GPU, peak allocated CUDA memory."""
    import torch

    out: dict[str, float | str] = {"peak_rss_mb": round(ru_maxrss_mb(), 1), "peak_cuda_mb": ""}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_info(device: Any) -> dict[str, Any]:
    """What the figures depend on: CPU, threads, library versions, device."""
    import torch
    import transformers

    gpu = ""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(str(device)))
    return {
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "gpu": gpu,
    }


def command_line() -> str:
    """The exact command that produced a row (repo-relative script path)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_table(title: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """A small aligned text table (rows share keys)."""
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def append_row(name: str, args: argparse.Namespace, device: Any, figures: Mapping[str, Any]) -> Path | None:
    """Append one row (metadata + figures) to ``<results-dir>/<name>.csv`` (widening the header if needed) and
    say where."""
    if args.no_csv:
        return None
    row: dict[str, Any] = {
        "timestamp": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "bench": name,
        "model": args.model,
        "smoke": int(bool(args.smoke)),
        "command": command_line(),
        **host_info(device),
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in figures.items()},
    }
    path = write_row(Path(args.results_dir) / f"{name}.csv", row)
    print(f"\nappended to {path}")
    return path


def write_row(path: Path, row: Mapping[str, Any]) -> Path:
    """Append ``row`` to the CSV at ``path``, widening its header (and rewriting it atomically) if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows: list[dict[str, str]] = []
    header: list[str] = []
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            old_rows = list(reader)
    missing = [k for k in row if k not in header]
    if header and not missing:
        with path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=header).writerow(row)
        return path
    fields = header + missing if header else list(row)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old_rows)
        writer.writerow(row)
    os.replace(tmp, path)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))
