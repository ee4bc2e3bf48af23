"""Run a peer (heretic or abliterix) offline on our model and prompts, then read its trials back.

    bash bench/peers/install.sh                                    # once: the peers' own venvs
    python bench/peers/run_peer.py heretic --smoke                 # 2 trials, 8 + 8 prompts, 16 tokens
    python bench/peers/run_peer.py heretic                         # the pareto step's work (see README)
    python bench/peers/run_peer.py heretic --resume                # continue its study after a stop
    python bench/peers/run_peer.py heretic --stop-by "2026-12-06 19:30"   # start no trial that cannot end by then

Steps, each in the run folder (``--out``; default study/peers/<model>-<peer>, where the study's Pareto section
reads it and it is committed with the study; a smoke run: bench/peers/runs/<model>-<peer>-smoke): the
prompt files and manifest (peer_inputs), the peer's config file (peer_configs), the peer itself via
its driver in its own venv with the Hub switched off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE,
HF_DATASETS_OFFLINE, an empty HF_HOME in the run folder), then peer_readback (our judges, report.csv), then, when
the study's pareto step has run, peer_count (both searches by the peer's own refusal rule).
A peer that is not installed or fails is reported with the end of its log, and the exit code says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from peer_configs import Comparison, write_config
from peer_count import count, our_search_dirs
from peer_env import HERE, OFFLINE, installed_python, peer_env
from peer_inputs import SPLITS_DIR, PeerInputError, compose, model_folder, write_prompts
from peer_readback import PeerOutputError, read_run

from refusal.app.signals import stop_on_signals
from refusal.artifacts import atomic_write_text
from refusal.errors import RefusalError
from refusal.run_files import ARCHIVED, COMPLETIONS, completions_text

PEER_RUNS = HERE.parents[1] / "study" / "peers"  # full-size runs: the study's record, read by its Pareto section
PEERS = ("heretic", "abliterix")
#: Our pareto step (bench/study.py: --pareto-trials 12, --n-test 100, --max-new-tokens 128; the
#: sweeper's n_startup_trials 8 in conf/experiment/pareto.yaml) and a smoke run of the whole pipeline.
FULL = {"trials": 12, "startup_trials": 8, "n_test": 100, "n_fit": None, "max_new_tokens": 128, "batch_size": 32}
SMOKE = {"trials": 2, "startup_trials": 8, "n_test": 8, "n_fit": 8, "max_new_tokens": 16, "batch_size": 8}
#: Seconds a peer gets to stop after --timeout's Ctrl+C, before it is killed (its journal is still read).
STOP_GRACE_S = 120
#: Seconds between looks at the peer's journal for a new trial (with --stop-by).
POLL_S = 5.0
#: The ways a segment is stopped before its study ends; --resume continues each.
STOP_REASONS = ("timeout", "stopped", "stop-by")


def trial_clock(run_dir: Path) -> tuple[int, float | None]:
    """The trials the peer's Optuna journal has started and the seconds its longest complete one took (None before
    one completes): what ``--stop-by`` needs to tell whether a trial just started can end in time. Journal records:
    op_code 4 creates a trial (numbered in creation order, with ``datetime_start``), op_code 6 with state 1 completes
    one; a line still being written is skipped."""
    starts: list[datetime] = []
    longest = None
    for journal in (run_dir / "checkpoints").glob("*.jsonl"):
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                op = json.loads(line)
            except json.JSONDecodeError:
                continue
            if op.get("op_code") == 4:
                starts.append(datetime.fromisoformat(op["datetime_start"]))
            elif op.get("op_code") == 6 and op.get("state") == 1 and op.get("trial_id", len(starts)) < len(starts):
                took = (datetime.fromisoformat(op["datetime_complete"]) - starts[op["trial_id"]]).total_seconds()
                longest = took if longest is None else max(longest, took)
    return len(starts), longest


def run_peer(peer: str, run_dir: Path, timeout_s: float | None, resume: bool = False,
             stop_by: datetime | None = None) -> dict:
    """The peer's driver in its own venv, offline, in ``run_dir``; its log in ``run_dir/peer.log`` (appended to
    when the peer continues its study there)."""
    driver = [str(installed_python(peer)), str(HERE / f"{peer}_driver.py")]
    return run_driver(driver, run_dir, peer_env(run_dir), timeout_s, resume, stop_by)


def wait_for_driver(proc: subprocess.Popen, run_dir: Path, timeout_s: float | None, stop_by: datetime | None) -> int | str:
    """The driver's exit code, or why it must be stopped: "timeout" after ``timeout_s``, "stop-by" when a trial
    starts that its longest complete trial says cannot end by ``stop_by`` (both peers prune a trial stopped by
    Ctrl+C, so stopping it as it starts loses seconds, not the trial's half hour)."""
    if stop_by is None:
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "timeout"
    end = None if timeout_s is None else time.monotonic() + timeout_s
    seen = trial_clock(run_dir)[0]
    while True:
        try:
            return proc.wait(timeout=POLL_S if end is None else max(0.0, min(POLL_S, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            if end is not None and time.monotonic() >= end:
                return "timeout"
        started, longest = trial_clock(run_dir)
        if started > seen:
            seen = started
            if longest is not None and datetime.now().timestamp() + longest > stop_by.timestamp():
                return "stop-by"


def run_driver(driver: Sequence[str], run_dir: Path, env: dict[str, str], timeout_s: float | None,
               resume: bool = False, stop_by: datetime | None = None) -> dict:
    """``driver`` in ``run_dir``, stopped by one Ctrl+C after ``timeout_s``, at a trial that cannot end by
    ``stop_by``, or when this process gets SIGINT or SIGTERM (``refusal.app.signals.stop_on_signals``); the driver
    runs in a session of its own, so a terminal's Ctrl+C reaches it once, from here, and this process outlives it
    to record the segment."""
    log = run_dir / "peer.log"
    start = time.perf_counter()
    with log.open("a" if resume else "w", encoding="utf-8") as fh:
        if resume:
            fh.write(f"\n[bench/peers] resumed {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
        proc = subprocess.Popen(driver, cwd=run_dir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = wait_for_driver(proc, run_dir, timeout_s, stop_by)
        except KeyboardInterrupt:
            rc = "stopped"
        if rc in STOP_REASONS:  # both peers prune the running trial and end their study cleanly
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):  # a second signal does not wait
                proc.kill()
                proc.wait()
        wall = round(time.perf_counter() - start, 1)
        if rc != 0 and not (run_dir / "trials.json").exists() and any((run_dir / "checkpoints").glob("*.jsonl")):
            subprocess.run([*driver, "--export"], cwd=run_dir, env=env, stdout=fh, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, check=False)  # the trials it finished, from its journal
    return {"returncode": rc, "wall_s": wall}


def write_run_record(run_dir: Path, record: dict, segments: list[dict]) -> dict:
    """``run.json``: the run's settings, its last segment's outcome and every segment (one per start or resume),
    written before the peer starts too, so a run cut off with its machine still says it began."""
    known = [s["wall_s"] for s in segments if s.get("wall_s") is not None]
    out = {**record, "wall_s": round(sum(known), 1), "segments": segments}
    if len(known) < len(segments):
        out["wall_s_note"] = "a segment was cut off before run_peer.py could time it; wall_s sums the others"
    (run_dir / "run.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def earlier_segments(run_dir: Path) -> list[dict]:
    """The segments of ``run.json`` before a resume; one still 'running' was cut off (its wall time is unknown)."""
    path = run_dir / "run.json"
    if not path.is_file():
        return [{"returncode": "cut off (no run.json)", "wall_s": None}]
    old = json.loads(path.read_text())
    segments = old.get("segments") or [{k: old.get(k) for k in ("returncode", "wall_s")}]
    return [{**s, "returncode": "cut off"} if s.get("returncode") == "running" else s for s in segments]


def check_resumable(peer: str, run_dir: Path, written: Path) -> None:
    """``run_dir`` holds this peer's interrupted study on the work just written to ``written`` (the same prompt
    files, manifest and config file, byte for byte); its stale exports are removed (the peer rewrites them) and an
    archived recording is unpacked for the driver to append to."""
    journals = sorted((run_dir / "checkpoints").glob("*.jsonl"))
    if len(journals) != 1:
        raise PeerInputError(f"{run_dir} holds no study of {peer} to resume (checkpoints/*.jsonl: {len(journals)} files); "
                             "run it without --resume in an empty folder")
    for fresh in sorted(p for p in written.rglob("*") if p.is_file()):
        old = run_dir / fresh.relative_to(written)
        if not old.is_file() or old.read_bytes() != fresh.read_bytes():
            raise PeerInputError(f"{old} differs from what this command writes ({fresh.relative_to(written)}): the study "
                                 "there ran other work; resume it with its own options, or start a new --out")
    for stale in ("trials.json", "settings.json"):
        (run_dir / stale).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "report", ignore_errors=True)
    archived = run_dir / ARCHIVED
    if archived.is_file():  # a committed partial run: the driver appends to the plain recording
        atomic_write_text(run_dir / COMPLETIONS, completions_text(run_dir))
        archived.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--model", default="qwen05")
    parser.add_argument("--smoke", action="store_true", help=f"the whole pipeline at tiny sizes: {SMOKE}")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value} ({SMOKE[key]} with --smoke)")
    parser.add_argument("--out", type=Path, help="the run folder (new or empty; with --resume, the study to continue)")
    parser.add_argument("--splits", type=Path, default=SPLITS_DIR)
    parser.add_argument("--cache-dir", help="the project's cache root holding models/ (default: $REFUSAL_CACHE or ~/.cache/refusal)")
    parser.add_argument("--judges", nargs="+", default=["substring", "heretic"], help="conf/judge names, first primary")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the peer is stopped")
    parser.add_argument("--stop-by", type=datetime.fromisoformat, default=None, metavar="'YYYY-MM-DD HH:MM'",
                        help="local time by which the peer must have stopped: a trial that its longest complete one "
                             "says cannot end by then is stopped as it starts (--resume continues the study)")
    parser.add_argument("--readback-only", action="store_true", help="judge and report an existing run folder again")
    parser.add_argument("--resume", action="store_true",
                        help="continue the peer's interrupted study in the run folder (same options as its first run)")
    args = parser.parse_args(argv)
    stop_on_signals()
    sizes = {k: v if (v := getattr(args, k)) is not None else (SMOKE if args.smoke else FULL)[k] for k in FULL}
    default = HERE / "runs" / f"{args.model}-{args.peer}-smoke" if args.smoke else PEER_RUNS / f"{args.model}-{args.peer}"
    run_dir = (args.out or default).resolve()
    try:
        if not args.readback_only:
            if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
                raise PeerInputError(f"{run_dir} is not empty (a peer resumes or asks about an old study there); "
                                     "remove it, pass another --out, or --resume its study")
            cfg = compose(args.model, sizes["n_test"], args.splits, [f"cache_dir={args.cache_dir}"] if args.cache_dir else [])
            comparison = Comparison(str(model_folder(cfg)), sizes["trials"], sizes["startup_trials"],
                                    sizes["max_new_tokens"], sizes["batch_size"], seed=int(cfg.seed))
            with tempfile.TemporaryDirectory() as tmp:
                written = Path(tmp) if args.resume else run_dir
                write_prompts(written, cfg, sizes["n_fit"])
                write_config(args.peer, written, comparison)
                if args.resume:
                    check_resumable(args.peer, run_dir, written)
            before = earlier_segments(run_dir) if args.resume else []
            record = {"peer": args.peer, "sizes": sizes, "offline_env": OFFLINE}
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            write_run_record(run_dir, record, [*before, {"started": started, "returncode": "running", "wall_s": None}])
            print(f"[{args.peer}] {'resuming' if args.resume else 'running'} in {run_dir} (log: peer.log)", flush=True)
            segment = run_peer(args.peer, run_dir, args.timeout, args.resume, args.stop_by)
            outcome = write_run_record(run_dir, {**record, **segment}, [*before, {"started": started, **segment}])
            rc = outcome["returncode"]
            if rc == 0:
                print(f"[{args.peer}] finished in {outcome['wall_s']} s", flush=True)
            else:
                if rc in STOP_REASONS:
                    print(f"[{args.peer}] {rc} after {segment['wall_s']} s; --resume continues its study", file=sys.stderr)
                else:
                    tail = (run_dir / "peer.log").read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
                    print(f"[{args.peer}] FAILED ({rc}) after {outcome['wall_s']} s; end of peer.log:\n" + "\n".join(tail),
                          file=sys.stderr)
                if not (run_dir / "trials.json").exists():
                    return 1
                print(f"[{args.peer}] reading back the trials it finished", file=sys.stderr)
        report = read_run(run_dir, args.judges)
        print(f"wrote {report / 'report.csv'} and {report / 'report.md'}")
        if not args.smoke and (ours := our_search_dirs(args.model)):
            print(f"wrote {count(run_dir, ours)} (both searches by {args.peer}'s own count)")
    except (PeerInputError, PeerOutputError, RefusalError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
