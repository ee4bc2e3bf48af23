"""Run every bench (bench/bench_*.py) and regenerate docs/BENCHMARKS.md from bench/results/*.csv.

Each bench runs in its own process (clean peak-memory figures, no state shared between them) with
the same --model/--smoke/--device; a failing bench is reported and the rest still run. The docs
page shows the latest row per bench and model (GPU rows apart from CPU rows), so a smoke run never hides a
real-model figure.

    python bench/run_all.py --smoke            # everything on the tiny model, < 2 minutes
    python bench/run_all.py --model qwen05     # the real measurement (an hour or more on a 2-core CPU)
    python bench/run_all.py --docs-only        # only re-render docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _common as C

BENCH = C.REPO / "bench"
DOCS = C.REPO / "docs" / "BENCHMARKS.md"
ORDER = ["extraction", "hooks", "generation", "selection", "inlp", "evaluate", "trial"]


# -- running ----------------------------------------------------------------------------------------
def discover() -> dict[str, Path]:
    """bench name -> script, known ones first in ORDER, then any new bench_*.py alphabetically."""
    found = {p.stem.removeprefix("bench_"): p for p in sorted(BENCH.glob("bench_*.py"))}
    return {name: found[name] for name in sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))}


def _takes(script: Path, flag: str) -> bool:
    """Whether a bench script takes ``flag``: its own, or a common one via ``_common.base_parser``."""
    text = script.read_text()
    common = "base_parser(" in text and f'"{flag}"' in (C.REPO / "bench" / "_common.py").read_text()
    return common or f'"{flag}"' in text


def bench_command(script: Path, args: argparse.Namespace) -> list[str]:
    """The bench's command line; flags a script does not define are left out (bench_inlp.py has no model)."""
    cmd = [sys.executable, str(script)]
    if args.smoke:
        cmd.append("--smoke")
    elif _takes(script, "--model"):
        cmd += ["--model", args.model]
    if args.device:
        if _takes(script, "--device"):
            cmd += ["--device", args.device]
        elif _takes(script, "--accelerator"):  # bench_inlp.py: Lightning accelerator names
            cmd += ["--accelerator", "gpu" if args.device.startswith("cuda") else args.device]
    if args.results_dir != C.RESULTS:
        if _takes(script, "--results-dir"):
            cmd += ["--results-dir", str(args.results_dir)]
        elif _takes(script, "--out"):
            cmd += ["--out", str(Path(args.results_dir) / f"{script.stem.removeprefix('bench_')}.csv")]
    return cmd


def run_benches(args: argparse.Namespace) -> list[dict]:
    scripts = discover()
    names = [n for n in scripts if (not args.only or n in args.only) and n not in (args.skip or [])]
    unknown = set(args.only or []) - set(scripts)
    if unknown:
        raise SystemExit(f"no bench named {sorted(unknown)}; found {sorted(scripts)}")
    summary = []
    for name in names:
        cmd = bench_command(scripts[name], args)
        shown = " ".join(["python", str(scripts[name].relative_to(C.REPO)), *cmd[2:]])
        print(f"\n=== {name}: {shown}", flush=True)
        t0 = time.perf_counter()
        # own process group, so a timeout also stops what the bench started (evaluate.py children)
        proc = subprocess.Popen(cmd, cwd=C.REPO, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        summary.append({"bench": name, "rc": rc, "seconds": time.perf_counter() - t0, "command": shown})
    C.print_table("run_all summary", summary)
    return summary


# -- docs -------------------------------------------------------------------------------------------
@dataclass
class Figure:
    key: str
    label: str
    target: float | None = None  # upper bound (value <= target passes)
    alt: str | None = None  # a second view shown next to the value (e.g. the fastest-runs ratio)
    note: str = ""


def _extraction(row: dict[str, str]) -> list[Figure]:
    t = C.TARGETS["extraction"]
    return [
        Figure("extract_over_decoder_ratio", "extraction ÷ base-decoder forward", t, "extract_over_decoder_min_ratio"),
        Figure("extract_over_causal_lm_ratio", "extraction ÷ CausalLM forward (logits)"),
        Figure("shared_over_decoder_ratio", "extraction, shared chat prefix run once ÷ base-decoder forward"),
        Figure("decoder_s", "base-decoder forward, s"),
        Figure("extract_s", "extract_activations (plain), s"),
        Figure("shared_s", "extract_activations (shared prefix, the default), s"),
        Figure("causal_lm_s", "CausalLM forward, s"),
    ]


def _hooks(row: dict[str, str]) -> list[Figure]:
    figures = [Figure("none_tok_per_s", "no intervention, tokens/s"),
               Figure("none_ms_per_step", "no intervention, ms per step")]
    derived = ("_min_ratio", "_attributed_ratio")
    for key in row:
        if not key.endswith("_ratio") or key.endswith(derived) or key == "max_intervention_ratio":
            continue
        name = key.removesuffix("_ratio")
        if name == "orthogonalized":
            figures.append(Figure(key, "orthogonalized weights ÷ none", None, f"{name}_min_ratio", "reference, no hooks"))
            continue
        figures.append(Figure(key, f"{name} ÷ none, end to end", C.TARGETS["hooks"], f"{name}_min_ratio"))
        if row.get(f"{name}_attributed_ratio"):
            figures.append(Figure(f"{name}_attributed_ratio", f"{name}: 1 + hook work ÷ step time", C.TARGETS["hooks"],
                                  note=f"{float(row[f'{name}_hook_ms_per_step']):.3f} ms of hook work per step"))
    return figures


def _selection(row: dict[str, str]) -> list[Figure]:
    tags = [k.removesuffix("_candidates") for k in row if k.endswith("_candidates")]  # <mode>_<scorer>
    figures = []
    for tag in tags:
        figures += [Figure(f"{tag}_candidates", f"{tag}: candidates scored"),
                    Figure(f"{tag}_s", f"{tag}: selection wall time, s", note=row.get(f"{tag}_pick", "")),
                    Figure(f"{tag}_s_per_candidate", f"{tag}: s per candidate")]
    for mode in dict.fromkeys(t.rsplit("_", 1)[0] for t in tags):
        figures.append(Figure(f"{mode}_shared_over_plain", f"{mode}: shared-prefix ÷ plain wall time", C.TARGETS["selection"],
                              note=f"same pick: {row.get(f'{mode}_same_pick', '?')}"))
    return figures + [Figure("activations_s", "activations (cache get), s")]


def _evaluate(row: dict[str, str]) -> list[Figure]:
    labels = {"cold_dequant": "cold incl. dequantize", "cold_cached": "cold, model cached", "warm": "warm (all cached)"}
    compare = "experiment=compare" in row.get("overrides", "")  # the README's first command; older rows: baseline only
    what = row.get("label") or ("compare (5 jobs)" if compare else "baseline only")
    figures = []
    for phase, label in labels.items():
        target = C.TARGETS["first_command"].get(phase) if compare and not row.get("label") else None
        figures += [Figure(f"{phase}_s", f"{what}, {label}: wall, s", target, note=row.get(f"{phase}_timings", "")),
                    Figure(f"{phase}_rss_mb", f"{label}: child peak RSS, MiB")]
    return figures


def _trial(row: dict[str, str]) -> list[Figure]:
    what = f"{row.get('prompts', '?')} + {row.get('prompts', '?')} prompts, {row.get('tokens', '?')} tokens"
    same_work = (row.get("prompts"), row.get("tokens")) == ("32", "32")  # heretic's work: only then judged
    peer = [Figure("peer_trial_s", f"{row['peer']}'s own trial on the same work, this run, s"),
            Figure("ratio_vs_peer", f"ours ÷ {row['peer']} (same run)", 1.0)] if row.get("peer") else []
    return [
        Figure("trial_s", f"lean trial ({row.get('intervention', '?')}, {what}), s",
               C.TARGETS["trial"] if same_work and not peer else None,
               "trial_min_s", note=f"varies {row.get('varied', '?')}; setup (load, fits, baseline) {_fmt(row.get('setup_s', ''))} s untimed"),
        *peer,
        Figure("generate_s", "steered generation on harmful prompts, s"),
        Figure("score_s", "judging + next-token KL on harmless prompts, s"),
        Figure("load_s", "config, data, tokenization, held model, s"),
        Figure("fit_s", "fits read back + intervention built, s"),
    ]


def _inlp(row: dict[str, str]) -> list[Figure]:
    return [
        Figure("fit_inlp_s", "fit_inlp (Lightning, L-BFGS), s", note=f"val acc {row.get('val_acc_ours', '')}"),
        Figure("reference_s", "scikit-learn reference INLP, s", note=f"val acc {row.get('val_acc_ref', '')}"),
        Figure("speedup_ref_over_ours", "reference ÷ fit_inlp"),
        Figure("n_useful_ours", "useful directions (fit_inlp)", note=f"reference: {row.get('n_useful_ref', '?')}"),
        Figure("iters_ours", "rank reached (fit_inlp)", note=f"reference: {row.get('iters_ref', '?')}"),
        Figure("max_abs_val_acc_diff", "max |val acc difference|"),
        Figure("min_cos_useful_dirs", "min cosine of useful directions"),
        Figure("leading_dirs_agreeing", "leading directions agreeing (|cos| ≥ 0.99)"),
        Figure("subspace_overlap", "subspace overlap (mean cos² of principal angles)"),
    ]


def _inlp_key(row: dict[str, str]) -> str:
    """bench_inlp.py rows: planted data grouped by problem size, or a model's study problem (to convergence)."""
    if row.get("problem", "planted") not in ("", "planted"):
        return f"{row['problem']} {row.get('n', '?')}×{row.get('d', '?')}, to convergence, {row.get('classifier', '?')}"
    return f"planted {row.get('n', '?')}×{row.get('d', '?')}, {row.get('iters', '?')} iters, {row.get('classifier', '?')}"


def _inlp_command(row: dict[str, str]) -> str:
    if row.get("problem", "planted") not in ("", "planted"):
        return f"python bench/bench_inlp.py --model {row['problem'].split()[0]}"
    flags = [("--n", "n"), ("--d", "d"), ("--iters", "iters"), ("--k", "k_planted"), ("--classifier", "classifier"),
             ("--epsilon", "epsilon"), ("--accelerator", "accelerator")]
    return " ".join(["python bench/bench_inlp.py", *(f"{f} {row[k]}" for f, k in flags if row.get(k, "") != "")])


def _generation(row: dict[str, str]) -> list[Figure]:
    """One figure per path and cell: the ratio to transformers' float32 generate (tok/s beside it)."""
    out = [Figure("read_gb_s", "machine: read bandwidth GB/s"), Figure("float32_gflop_s", "machine: float32 GFLOP/s"),
           Figure("bfloat16_gflop_s", "machine: bfloat16 GFLOP/s")]
    for key in row:
        if key.endswith("_ratio") and "x" in key:
            cell = key.removesuffix("_ratio")
            path, size = cell.rsplit("_", 1)
            same = row.get(f"{cell}_same_40_chars", "")
            note = f"{100 * float(same):.0f}% of completions equal float32's in their first 40 characters" if same != "" else ""
            if same != "" and row[key] != "" and float(row[key]) >= C.TARGETS["generation"] and float(same) >= 0.95:
                note += f"; meets the target (≥ {C.TARGETS['generation']:g}× at ≥ 95%)"
            out.append(Figure(key, f"{path}, {size.replace('x', ' rows × ')} tokens: ratio (tok/s)",
                              alt=f"{cell}_tok_s", note=note))
    for key in row:  # the other passes of a run on each path's bundle (bench_generation.other_passes)
        if key.endswith(("_extraction_s", "_scoring_s")) and row[key] != "":
            path, what = key.removesuffix("_s").rsplit("_", 1)
            out.append(Figure(key, f"{path}: {'activation extraction' if what == 'extraction' else 'teacher-forced scoring'}, s"))
    return out


SKIP_GENERIC = set(C.META_COLUMNS) | {"peak_rss_mb", "peak_cuda_mb"}


def _generic(row: dict[str, str]) -> list[Figure]:
    """Any bench without a spec (e.g. a new one): every non-metadata column, no targets."""
    return [Figure(k, k) for k in row if k not in SKIP_GENERIC]


@dataclass
class Section:
    title: str
    about: str
    figures: Callable[[dict[str, str]], list[Figure]]
    key: Callable[[dict[str, str]], str] = lambda row: row.get("model") or "?"
    command: Callable[[dict[str, str]], str] = lambda row: row.get("command") or "?"
    smoke: Callable[[dict[str, str]], bool] = lambda row: row.get("smoke") in ("1", "True", "true")


SECTIONS = {
    "extraction": Section(
        "Activation extraction vs. a plain forward pass",
        "`extract_activations` (pre-hooks copy the post-instruction residuals of every layer) ÷ the base decoder's "
        "forward on the same length-sorted batches; also ÷ the full CausalLM forward. One warm-up, median of the "
        "repeats (fastest-runs ratio in brackets).",
        _extraction,
    ),
    "hooks": Section(
        "Hook overhead during generation",
        "Batched greedy generation (end of turn ignored: the same token count every run) with each registered intervention active "
        "÷ no intervention; random DiM direction / random orthonormal INLP basis (k=8). The orthogonalized-weights "
        "model has no hooks: the 1.00 reference, so its distance from 1.00 is the noise floor of that run. "
        "Interleaved rounds; the end-to-end value is the median over rounds of each round's variant ÷ none (paired, "
        "so load that slows a whole round cancels), the fastest-runs ratio in brackets. On a shared 2-core machine "
        "single generations vary by ±15%, more than the effect, so each intervention also gets an attributed figure: "
        "its hooks' own tensor work for one decode step (every hook once on a `[batch, 1, d]` tensor, fastest of 5 "
        "trials) ÷ the unhooked time per step, plus 1.",
        _hooks,
    ),
    "selection": Section(
        "DiM direction selection",
        "CandidateScorer + select_direction with train.py's settings (conf/fit/default.yaml: val prompts per class, "
        "batch size, filters) on cached activations: `full` scores every eligible layer × post-instruction position "
        "(positions=all, shortlist=0, as Arditi et al.), `shortlist` is train.py's default (last position for every "
        "layer, then all positions of the best layers), `last` only the last position. The picked candidate is in "
        "the notes column.",
        _selection,
    ),
    "inlp": Section(
        "INLP fitting",
        "`bench/bench_inlp.py`: `fit_inlp` (Lightning, L-BFGS) vs. the scikit-learn reference, on planted data "
        "(no model, both for the same number of iterations) and on the study's own INLP problem (`--model`: a "
        "packaged model's cached activations at its DiM layer, both run to convergence, as the study fits). Late "
        "INLP directions are fitted on data near chance, so the two implementations' later directions rotate within "
        "a shared subspace: the subspace overlap (mean cos² of the principal angles, 1 = the same span) says how far.",
        _inlp, key=_inlp_key, command=_inlp_command,
        smoke=lambda row: (row.get("n"), row.get("d")) == ("512", "64"),
    ),
    "evaluate": Section(
        "End-to-end `python evaluate.py`",
        "The README's first command (`evaluate.py experiment=compare`: baseline and four interventions, one model "
        "load, one fit; rows before it timed the baseline-only `evaluate.py`) as a child process with fresh "
        "REFUSAL_CACHE / REFUSAL_ARTIFACTS: cold including "
        "GGUF dequantization, cold with the float checkpoint symlinked in, and warm (second run, everything "
        "cached). Peak RSS is the child's (wait4 ru_maxrss). Notes: evaluate.py's own timing breakdown. A labelled "
        "row is another workload run the same way (`--label`, its overrides in the command line), not judged.",
        _evaluate, key=lambda row: row.get("model", "?") + (f" ({row['label']})" if row.get("label") else ""),
    ),
    "generation": Section(
        "Greedy decoding throughput",
        "`bench/bench_generation.py`: one batch of `rows` prompts (half harmful, half harmless), greedy, `tokens` new "
        "tokens at most; tokens/s counts new tokens up to each completion's end of turn. Ratio: tokens/s ÷ "
        "`transformers`' `generate` on the float32 model at 64 rows and the same budget, measured in the same run "
        "(target ≥ 4× with ≥ 95% of completions equal to float32's in their first 40 characters, issue 24). Paths: "
        "`refusal-float32` (our loop, exact: its completions equal the reference's), `refusal-bf16-matmul` "
        "(`model.matmul=bfloat16`), `refusal-bfloat16` (`model.dtype=bfloat16`). The machine rows are measured in "
        "the same run: a float32 step that only read its weights once would reach rows × bandwidth ÷ 4·params "
        "tokens/s; one bounded by float32 arithmetic, float32 GFLOP/s ÷ 2·params. The key/value cache reserves "
        "room for the new tokens (`refusal.runtime.kv_cache`), so a step never copies it. On each of our paths the "
        "same run also times the run's other passes on the reference rows' prompts: activation extraction, and "
        "teacher-forced scoring of the float32 path's completions (the vocabulary head stays float32 on every path).",
        _generation,
    ),
    "trial": Section(
        "Lean search trial (Optuna Pareto search)",
        "`bench/bench_trial.py`: one trial of `experiment=pareto_*` (`run_evaluation` with `eval=trial`, in-process, "
        "the model held): steered greedy generation on the test split's first harmful prompts, judged, and next-token "
        "KL on its first harmless prompts. The model load, fits and unsteered baseline (generations and logits) are "
        "paid by an untimed first trial, as in a search; each timed trial steers with a new value, so nothing is a "
        "cache hit. Median of the repeats (fastest in brackets). Target: with `--peer heretic` (or abliterix), the peer's "
        "own trials are timed on the same work in the same run (bench/peers/run_peer.py: our model folder, test prompts "
        "and budget) and ours ÷ theirs must be ≤ 1; without it, 32 s per trial, heretic's time on the same checkpoint "
        "in one earlier run set to 32 + 32 prompts and max_response_length=32 (heretic-llm 1.4.0's defaults: "
        "100 + 100 prompts, max_response_length=100, KL from the first generated token). One row per model and "
        "peer timed beside it.",
        _trial, key=lambda row: row.get("model", "?") + (f" (vs {row['peer']})" if row.get("peer") else ""),
    ),
}


def _num(value: str) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _fmt(value: str) -> str:
    x = _num(value)
    if x is None:
        return value or "–"
    if x.is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def _cell(text: str) -> str:
    """Markdown-table-safe text."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _hardware(row: dict[str, str]) -> str:
    """One line of what the figures depend on (also for rows written by benches with other column names)."""
    parts = [f"{row.get('cpu_count') or row.get('cpus') or '?'} CPU"
             + (f" ({row['cpu']})" if row.get("cpu") else ""),
             f"{row.get('torch_threads', '?')} torch threads",
             f"device {row.get('device') or row.get('accelerator') or '?'}" + (f" ({row['gpu']})" if row.get("gpu") else "")]
    if row.get("loadavg_1m"):
        parts.append(f"load {row['loadavg_1m']}")
    versions = [f"torch {row['torch']}" if row.get("torch") else "",
                f"transformers {row['transformers']}" if row.get("transformers") else "",
                f"python {row['python']}" if row.get("python") else ""]
    parts.append(", ".join(v for v in versions if v))
    if row.get("host"):
        parts.append(f"host {row['host']}")
    return "; ".join(p for p in parts if p)


def _on_gpu(row: dict[str, str]) -> str:
    """' on <GPU name>' for a row measured on a GPU: its figures sit beside the CPU's instead of replacing them."""
    device = row.get("device") or row.get("accelerator") or ""
    if row.get("gpu") or device.startswith("cuda") or device == "gpu":
        return f" on {row.get('gpu') or 'GPU'}"
    return ""


def latest_rows(path: Path, section: Section) -> dict[str, dict[str, str]]:
    """group key (model, and the GPU where there was one) -> its last appended row."""
    latest: dict[str, dict[str, str]] = {}
    for row in C.read_rows(path):
        latest[section.key(row) + _on_gpu(row)] = row
    return latest


def section_for(name: str) -> Section:
    return SECTIONS.get(name) or Section(name, f"From `bench/bench_{name}.py`.", _generic)


def render_section(name: str, rows: dict[str, dict[str, str]]) -> list[str]:
    section = section_for(name)
    out = [f"## {section.title}", "", section.about, "",
           "| model | figure | value | target | result | notes |", "|---|---|---|---|---|---|"]
    for model, row in rows.items():
        smoke = section.smoke(row)
        shown = f"{model} (smoke)" if smoke else model
        for fig in section.figures(row):
            value = row.get(fig.key, "")
            if value == "":
                continue
            cell = _fmt(value)
            if fig.alt and row.get(fig.alt, "") != "":
                cell += f" ({_fmt(row[fig.alt])})"
            target, result = "–", "–"
            if fig.target is not None:
                target = f"≤ {fig.target:.2f}"
                x = _num(value)
                if smoke:
                    result = "not judged (smoke)"
                elif x is not None:
                    result = "pass" if x <= fig.target else "**FAIL**"
            out.append(f"| {_cell(shown)} | {_cell(fig.label)} | {_cell(cell)} | {target} | {result} | {_cell(fig.note)} |")
        mem = [f"peak RSS {_fmt(row['peak_rss_mb'])} MiB" if row.get("peak_rss_mb") else "",
               f"peak CUDA {_fmt(row['peak_cuda_mb'])} MiB" if row.get("peak_cuda_mb") else ""]
        mem = ", ".join(m for m in mem if m)
        if mem:
            out.append(f"| {_cell(shown)} | memory (this process) | {mem} | – | – | |")
    out += [""]
    for model, row in rows.items():
        extra = f"; notes: {row['notes']}" if row.get("notes") else ""
        extra += f"; skipped: {row['skipped']}" if row.get("skipped") else ""
        out.append(f"- **{model}** — {row.get('timestamp', '?')} — {_hardware(row)}{extra}  ")
        out.append(f"  `{section.command(row)}`")
    out.append("")
    return out


def render_docs(results_dir: Path, docs_path: Path) -> Path:
    csvs = {p.stem: p for p in sorted(Path(results_dir).glob("*.csv"))}
    names = [n for n in ORDER if n in csvs] + sorted(n for n in csvs if n not in ORDER)
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python bench/run_all.py` on {now} from `bench/results/*.csv` (the latest row per bench "
        "and model, a GPU's rows apart from the CPU's; the CSVs keep the history). Do not edit by hand: rerun the "
        "benches, or `python bench/run_all.py --docs-only` to re-render.",
        "",
        "Wall times on a shared machine are noisy: other processes only ever add time, so when a median "
        "misses a target, look at the fastest-runs ratio (in brackets) and rerun on an idle machine before "
        "concluding anything. Smoke rows (tiny random model, a few prompts) check that the scripts work; "
        "their figures are not judged against the targets.",
        "",
        "## How to run",
        "",
        "```bash",
        ". .venv/bin/activate",
        "python bench/run_all.py --smoke                 # all benches on the tiny model (< 2 min), re-renders this page",
        "python bench/run_all.py --model qwen05          # the real measurement (CPU: an hour or more, see below)",
        "python bench/bench_extraction.py --model qwen05 # one bench; each appends a row to bench/results/<name>.csv",
        "python bench/bench_hooks.py --model smollm2 --repeats 9",
        "python bench/bench_selection.py --model qwen05  # full, shortlist (train.py's default) and last; plain vs shared prefix",
        "python bench/bench_evaluate.py --model qwen05 [--skip-dequantize]",
        "python bench/bench_trial.py --model qwen05      # lean Optuna trials (inlp_flip α), 32 + 32 prompts, 32 tokens",
        "python bench/run_all.py --docs-only             # re-render from the CSVs",
        "bash bench/gpu_check.sh                         # on a CUDA machine: tests, bf16/device_map checks, benches on qwen05; figures to $OUT/gpu_check.txt (offline machine: docs/results/gpu_check.md)",
        "```",
        "",
        "Common flags: `--model NAME` (conf/model/NAME.yaml, default qwen05), `--smoke`, `--device cpu|cuda`, "
        "`--repeats N`, `--no-csv`. CI runs only the smoke mode (tests/test_bench_smoke.py, into a temp folder).",
        "",
        "Cost on a 2-core CPU (qwen05, float32; one forward pass over 64 embedded prompts ≈ 12 s): extraction "
        "≈ 3 min (12 passes), hooks ≈ 7 variants × (repeats + 1) generations (smollm2, 9 rounds: ≈ 10 min), "
        "selection ≈ 48 val-prompt forwards per candidate, ≈ 11 s each (`last` 19 candidates, `shortlist` 27, "
        "`full` 95: ≈ 25 min; qwen15 ≈ 36–40 s per candidate, `shortlist` 30 and `full` 110: ≈ 90 min with its "
        "100 s of activations), and evaluate runs the default evaluate.py three times, each cold run including "
        "extraction and train.py's DiM selection: budget an hour or more for `run_all.py --model qwen05` on CPU (`--skip "
        "evaluate`, or `bench_evaluate.py --override fit.dim.positions=last`, for a shorter run). "
        "On a GPU `bash bench/gpu_check.sh` does all of it in about 5-7 minutes.",
        "",
        "| bench | figure | target |",
        "|---|---|---|",
        f"| extraction | extract_activations ÷ base-decoder forward | ≤ {C.TARGETS['extraction']:.2f} |",
        f"| hooks | generation with an intervention ÷ without | ≤ {C.TARGETS['hooks']:.2f} (orthogonalized model: the 1.00 reference) |",
        "| selection | DiM selection: shared-prefix ÷ plain scorer wall time, same run, same pick | ≤ 0.5 |",
        "| inlp | fit_inlp vs. the scikit-learn reference (bench_inlp.py; planted data, no model) | – |",
        f"| evaluate | the first command (experiment=compare), cold incl. dequantize / warm, wall s | ≤ {C.TARGETS['first_command']['cold_dequant']:.0f} / ≤ {C.TARGETS['first_command']['warm']:.0f} |",
        f"| trial | a lean trial on 32+32 prompts, 32 tokens, wall s (heretic's per-trial time at those settings, not its defaults) | ≤ {C.TARGETS['trial']:.0f} |",
        "",
    ]
    if not names:
        lines += ["No results yet: run `python bench/run_all.py --smoke`.", ""]
    for name in names:
        lines += render_section(name, latest_rows(csvs[name], section_for(name)))
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text("\n".join(lines))
    return docs_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen05")
    parser.add_argument("--smoke", action="store_true", help="every bench on the tiny model with few prompts")
    parser.add_argument("--device", default=None, help="passed to every bench (cpu, cuda)")
    parser.add_argument("--only", nargs="+", default=None, help="bench names to run (e.g. extraction hooks)")
    parser.add_argument("--skip", nargs="+", default=None, help="bench names not to run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per bench")
    parser.add_argument("--results-dir", type=Path, default=C.RESULTS)
    parser.add_argument("--docs-out", type=Path, default=DOCS, help="where to write the markdown page")
    parser.add_argument("--docs-only", action="store_true", help="skip running; only re-render the docs")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    summary = [] if args.docs_only else run_benches(args)
    path = render_docs(args.results_dir, args.docs_out)
    print(f"\nwrote {path} ({time.perf_counter() - t0:.0f}s in all)")
    return 0 if all(s["rc"] == 0 for s in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
