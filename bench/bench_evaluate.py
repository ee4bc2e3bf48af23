"""End-to-end wall time and peak memory of the README's first command: cold and warm.

The command is ``python evaluate.py experiment=compare`` (baseline, DiM ablation, actadd, INLP
nullspace and flip as one multirun sharing one model load and one fit); ``--single`` times the
plain ``python evaluate.py`` (baseline only) instead. Three runs as a subprocess, each with fresh
REFUSAL_CACHE and REFUSAL_ARTIFACTS temp dirs (the user's caches are never written):

* ``cold_dequant``: empty cache, so it includes assembling and dequantizing the packaged GGUF
  (the float checkpoint lives in REFUSAL_CACHE/models), extraction, DiM selection, generation;
* ``cold_cached``: a fresh cache whose ``models/`` entries are symlinks to already dequantized
  checkpoints: everything but dequantization is recomputed;
* ``warm``: the same command again on the cold_cached dirs: activations, artifacts and
  generations all hit the cache.

Peak RSS is the child's ru_maxrss (os.wait4 on that child, so runs do not mix). The hydra run
dir goes to the temp dir too, so nothing lands in outputs/.

    python bench/bench_evaluate.py --model qwen05
    python bench/bench_evaluate.py --smoke
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

NAME = "evaluate"
PHASES = ("cold_dequant", "cold_cached", "warm")
SMOKE_OVERRIDES = [
    "data.n_train=8", "data.n_val=4", "data.n_test=4", "eval.max_new_tokens=4", "fit.dim.positions=last",
    "geometry.enabled=false", "logger=none",
]


def stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, Ctrl-Z): Linux's /proc state ``T``; False where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] in "Tt"  # the state follows the command name, which may hold spaces


def run_child(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` to completion; its running seconds (time it spent stopped, e.g. paused to free the CPU, is
    neither timed nor counted against ``timeout``), exit code and that child's peak RSS (MiB)."""
    with log_path.open("wb") as log:
        running, last = 0.0, time.perf_counter()
        # own process group: a timeout or Ctrl-C also stops what evaluate.py started (e.g. wandb's service)
        proc = subprocess.Popen(cmd, cwd=C.REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:  # wait4 (not Popen.wait) so the rusage is this child's alone
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                now = time.perf_counter()
                if not stopped(proc.pid):
                    running += now - last
                last = now
                if pid:
                    break
                if running > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    _, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.05)
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / (1 << 20) if sys.platform == "darwin" else usage.ru_maxrss / 1024
    return {"s": running, "rss_mb": rss, "rc": proc.returncode, "timed_out": running > timeout}


def link_models(src: Path, dst: Path) -> list[str]:
    """Symlink every dequantized checkpoint and assembled GGUF of ``src/models`` into ``dst/models``."""
    src_models, dst_models = src / "models", dst / "models"
    dst_models.mkdir(parents=True, exist_ok=True)
    linked = []
    if src_models.is_dir():
        for entry in sorted(src_models.iterdir()):
            if entry.name.startswith("."):
                continue  # staging folders of an interrupted dequantization
            (dst_models / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
            linked.append(entry.name)
    return linked


def dequantized_present(model: str, cache: Path) -> bool | None:
    """Whether ``cache`` already holds the float checkpoint of a packaged model (None: not packaged)."""
    cfg = C.model_config(model)
    if cfg.get("source") != "gguf_package":
        return None
    return (cache / "models" / f"{cfg['gguf']['sha256'][:16]}-hf" / ".complete").exists()


def timings_of(run_dir: Path) -> str:
    """The runs' own timing breakdown from results.json (load, fit, generate, ...), summed over a
    multirun's jobs."""
    total: dict[str, float] = {}
    for path in sorted([*run_dir.glob("results.json"), *run_dir.glob("*/results.json")]):
        try:
            timings = json.loads(path.read_text()).get("timings", {})
        except (OSError, ValueError):
            continue
        for key, value in timings.items():
            total[key] = total.get(key, 0.0) + float(value)
    return " ".join(f"{k}={v:.1f}" for k, v in total.items())


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip-dequantize", action="store_true",
                        help="skip the cold_dequant run (it writes the multi-GB float checkpoint again)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="which runs (warm reruns on the dirs of the cold run before it)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for evaluate.py")
    parser.add_argument("--single", action="store_true", help="time plain `evaluate.py` (baseline only), not the compare")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per evaluate.py run")
    parser.add_argument("--label", default="", help="a workload other than the first command (its own row in "
                        "BENCHMARKS, never judged against the first command's targets), e.g. '7-job multirun'")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temp dirs (needs room for a checkpoint)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (logs, outputs) for inspection")
    args = C.parse(parser, argv)
    overrides = ([] if args.single else ["experiment=compare"]) + [f"model={args.model}"]
    if args.device:
        overrides.append(f"model.device={args.device}")
    overrides += (SMOKE_OVERRIDES if args.smoke else []) + list(args.override)
    tmp = Path(tempfile.mkdtemp(prefix="bench_evaluate_", dir=args.tmp))
    user_cache = C.cache_dir()
    results: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    try:
        packaged = dequantized_present(args.model, user_cache) is not None
        if not packaged:
            notes.append(f"{args.model} is not a packaged GGUF: nothing to dequantize, cold_dequant not run")
        phases = [p for p in PHASES if p in args.phases and not (p == "cold_dequant" and (args.skip_dequantize or not packaged))]
        root = tmp / "cached"
        for phase in phases:
            if phase != "warm":  # warm reruns on the previous cold run's dirs
                root = tmp / ("cold_dequant" if phase == "cold_dequant" else "cached")
            cache, artifacts = root / "cache", root / "artifacts"
            if phase == "cold_cached":
                donor = tmp / "cold_dequant" / "cache" if "cold_dequant" in results else user_cache
                link_models(donor, cache)
                if dequantized_present(args.model, cache) is False:
                    notes.append(f"cold_cached: no dequantized {args.model} in {donor}/models, so it dequantized too")
            cache.mkdir(parents=True, exist_ok=True)
            artifacts.mkdir(parents=True, exist_ok=True)
            run_dir = tmp / "runs" / phase
            cmd = [sys.executable, "evaluate.py", *overrides, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}"]
            env = {**os.environ, "REFUSAL_CACHE": str(cache), "REFUSAL_ARTIFACTS": str(artifacts)}
            print(f"[{phase}] REFUSAL_CACHE={cache} REFUSAL_ARTIFACTS={artifacts} {' '.join(cmd[1:])}", flush=True)
            out = run_child(cmd, env, tmp / f"{phase}.log", args.timeout)
            out["timings"] = timings_of(run_dir)
            results[phase] = out
            print(f"[{phase}] {out['s']:.1f}s rc={out['rc']} peak RSS {out['rss_mb']:.0f} MiB  {out['timings']}", flush=True)
            if out["rc"] != 0:
                tail = (tmp / f"{phase}.log").read_text(errors="replace").splitlines()[-25:]
                print("\n".join(tail), file=sys.stderr)
                notes.append(f"{phase} failed with rc={out['rc']}" + (" (timed out)" if out["timed_out"] else ""))
                break
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    label = {"cold_dequant": "cold incl. dequantize", "cold_cached": "cold, model cached", "warm": "warm (all cached)"}
    C.print_table(
        f"python evaluate.py {' '.join(overrides)}  (child process; fresh caches)",
        [{"run": label[p], "wall_s": r["s"], "peak_rss_mb": r["rss_mb"], "rc": r["rc"], "evaluate timings (s)": r["timings"]}
         for p, r in results.items()],
    )
    figures: dict[str, Any] = {"overrides": " ".join(overrides), "label": args.label}
    for phase in PHASES:
        r = results.get(phase)
        figures[f"{phase}_s"] = r["s"] if r else ""
        figures[f"{phase}_rss_mb"] = round(r["rss_mb"], 1) if r else ""
        figures[f"{phase}_rc"] = r["rc"] if r else ""
        figures[f"{phase}_timings"] = r["timings"] if r else ""
    if notes:
        figures["notes"] = "; ".join(notes)
        print("notes: " + "; ".join(notes))
    figures.update(C.peak_memory("cpu"))  # this driver process; the children's peaks are above
    C.append_row(NAME, args, args.device or C.model_config(args.model).get("device", "auto"), figures)
    return 0 if all(r["rc"] == 0 for r in results.values()) and len(results) == len(phases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
