"""The study behind docs/RESULTS.md: Hydra multiruns per packaged model, then the report.

    python bench/study.py                                  # every packaged model that is installed
    python bench/study.py --models qwen05 smollm2          # some models
    python bench/study.py --models qwen15 --sweeps main actadd --n-test 16
    python bench/study.py --render-only                    # re-render docs/RESULTS.md from study/

Each step is an ordinary command (printed, and listed in the report): ``train.py`` once per model,
then ``evaluate.py -m`` sweeps into ``study/<model>/<sweep>/`` and ``python -m refusal.geometry``.
A step whose output already exists is skipped, so an interrupted study resumes where it stopped.
Nothing here runs in CI. Measured on 2 CPU cores with the defaults: qwen05 ≈ 30 min, qwen15 ≈ 110
(train.py alone 35), smollm2 ≈ 10, gemma3_270m ≈ 15.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _common import host_info  # noqa: E402

from refusal.artifacts import atomic_write_text  # noqa: E402
from refusal.report import flat_row, load_runs, markdown_table  # noqa: E402

PACKAGED = ["qwen05", "qwen15", "smollm2", "gemma3_270m"]
SPLITS_DIR = REPO.parent / "shared" / "data" / "refusal_direction_splits"
SWEEPS = ["main", "actadd", "k", "alpha"]
ALPHAS = "0.25,0.5,2.0"
KS = [1, 2, 4, 8]


def sweep_overrides(sweep: str, rank: int) -> list[str]:
    """The Hydra multirun overrides of one sweep (``rank`` = INLP directions fitted: k=all)."""
    if sweep == "main":
        return ["intervention=none,dim_ablation,inlp_nullspace,inlp_flip"]
    if sweep == "actadd":
        return ["intervention=actadd", "intervention.coeff=-1.0,1.0"]
    if sweep == "k":
        ks = [k for k in KS if k < rank]
        return ["intervention=inlp_nullspace,inlp_flip", "intervention.k=" + ",".join(map(str, ks))] if ks else []
    if sweep == "alpha":
        return ["intervention=inlp_flip", f"intervention.alpha={ALPHAS}"]
    raise SystemExit(f"unknown sweep {sweep!r}; choose from {SWEEPS}")


def _model_order(model: str) -> tuple[int, str]:
    """Packaged models in the issue's order, others after them (studies may add models one at a time)."""
    return (PACKAGED.index(model) if model in PACKAGED else len(PACKAGED), model)


def _command_order(command: str) -> tuple[int, str]:
    return _model_order(next((a.split("=", 1)[1] for a in shlex.split(command) if a.startswith("model=")), ""))


def installed(model: str) -> bool:
    import yaml

    from refusal.models.gguf_package import packaged_parts_installed

    cfg = yaml.safe_load((REPO / "conf" / "model" / f"{model}.yaml").read_text())
    return packaged_parts_installed(cfg["gguf"]["parts"])


class Study:
    def __init__(self, root: Path, common: list[str]) -> None:
        self.root, self.common = root, common
        self.commands: list[str] = []

    def run(self, argv: list[str], log: Path, done: Path) -> bool:
        """Run one step unless ``done`` exists; output goes to ``log``; returns success."""
        shown = " ".join(shlex.quote(a) for a in ["python", *argv])
        self.commands.append(shown)
        stamp = log.with_suffix(".command")
        if done.exists():
            if stamp.exists() and stamp.read_text().strip() == shown:
                print(f"skip (done): {shown}")
                return True
            raise SystemExit(f"{done} was made by another command (see {stamp}); delete {done.parent} "
                             "to redo it with these settings, or pass another --root")
        print(f"run: {shown}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, shown + "\n")
        t0 = time.perf_counter()
        env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
        with log.open("w") as fh:
            rc = subprocess.call([sys.executable, *argv], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
        took = time.perf_counter() - t0
        timings = self.root / "timings.json"
        saved = json.loads(timings.read_text()) if timings.exists() else {}
        saved[str(log.relative_to(self.root))] = round(took, 1)
        atomic_write_text(timings, json.dumps(saved, indent=2) + "\n")
        print(f"  {'ok' if rc == 0 else f'FAILED (exit {rc}), see {log}'} in {took / 60:.1f} min", flush=True)
        return rc == 0

    def model(self, model: str, sweeps: list[str]) -> None:
        out = self.root / model
        args = [f"model={model}", *self.common]
        if not self.run(["train.py", *args, f"hydra.run.dir={out / 'train'}"], out / "train.log", out / "train" / "fitted.json"):
            return
        rank = int(json.loads((out / "train" / "fitted.json").read_text()).get("inlp_rank", 0))
        for sweep in sweeps:
            extra = sweep_overrides(sweep, rank)
            if extra:
                self.run(["evaluate.py", "-m", *args, *extra, f"hydra.sweep.dir={out / sweep}"],
                         out / f"{sweep}.log", out / sweep / "report.csv")
        self.run(["-m", "refusal.geometry", "--interventions",
                  "none,actadd:coeff=-1.0,dim_ablation,inlp_nullspace,inlp_flip", "--out", str(out / "geometry"), *args],
                 out / "geometry.log", out / "geometry" / "geometry.json")


# -- the report -----------------------------------------------------------------------------------
def _rows(model_dir: Path, sweep: str) -> list[dict[str, Any]]:
    return [flat_row(r, run) for run, r in load_runs(model_dir / sweep) if r.get("status", "ok") == "ok"]


def _order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Intervention order of the issue, then by parameter value (numbers as numbers)."""
    rank = {"none": 0, "actadd": 1, "dim_ablation": 2, "inlp_nullspace": 3, "inlp_flip": 4}
    return sorted(rows, key=lambda r: (rank.get(r["intervention"], 9), *(float(r.get(f"params/{k}") or 0) for k in ("coeff", "alpha", "k"))))


def _relative(text: str) -> str:
    """Paths as a reader of the checkout would write them."""
    return text.replace(f"{REPO}/", "").replace(f"{REPO.parent}/", "../")


def render(root: Path, docs: Path, meta: dict[str, Any]) -> Path:
    from refusal.report_plots import plot_tunability

    figures = docs / "results"
    figures.mkdir(parents=True, exist_ok=True)
    md = [
        "# Results: steering refusal on the packaged models", "",
        f"Generated by `python bench/study.py` on {meta['date']} ({meta['hardware']}); do not edit by hand "
        "(`python bench/study.py --render-only` re-renders from `study/`).", "",
        f"Data: {meta['data']}. Greedy decoding, {meta['max_new_tokens']} new tokens. Refusal rate = substring match "
        "(Arditi et al. / JailbreakBench phrases) with a 95% Wilson interval in brackets; score = first-token refusal "
        "log-odds; ppl = perplexity of the unsteered model's own harmless completions under the intervention; "
        "KL = next-token KL(baseline ‖ steered) on harmless prompts; lands = geometry label at the intervention layer "
        "(see below). `k=all` is every INLP direction fitted; actadd c=−1 is read on harmful prompts (suppression), "
        "c=+1 on harmless prompts (induced refusal column).", "",
    ]
    main_rows, tune_rows, tune_plot, geo_sections, notes = [], [], [], [], []
    for model in sorted(meta["models"], key=_model_order):
        mdir = root / model
        if not mdir.exists():
            continue
        fitted_path = mdir / "train" / "fitted.json"
        fitted = json.loads(fitted_path.read_text()) if fitted_path.exists() else {}
        rows = _order(_rows(mdir, "main") + _rows(mdir, "actadd"))
        main_rows += rows
        tune = rows + _rows(mdir, "k") + _rows(mdir, "alpha")
        tune_plot += tune
        tune_rows += [r for r in _order(tune) if r["intervention"].startswith("inlp")]
        base = next((r for r in rows if r["intervention"] == "none"), None)
        acc = ", ".join(f"{a:.2f}" for a in fitted.get("inlp_val_accuracy", []))
        notes.append(
            f"- **{model}**: DiM layer {fitted.get('layer')} / {fitted.get('n_layers', '?')}, position "
            f"{fitted.get('position')}; INLP rank {fitted.get('inlp_rank')} (useful {fitted.get('inlp_n_useful')}), "
            f"val accuracy per iteration [{acc}]"
            + (f"; baseline harmful refusal {100 * base['harmful/refusal_rate']:.0f}%" if base else "")
        )
        geo = mdir / "geometry" / "geometry.md"
        if geo.exists():
            png = figures / f"{model}_geometry.png"
            shutil.copyfile(mdir / "geometry" / "geometry_landing.png", png)
            body = geo.read_text().split("\n", 1)[1].replace("![landing](geometry_landing.png)", f"![{model} geometry](results/{png.name})")
            geo_sections += [f"### {model}", _relative(body)]
    md += ["## Main table", "", markdown_table(main_rows), "", "Fitted directions:", "", *notes, ""]
    if tune_rows:
        plot = plot_tunability(tune_plot, figures / "tunability.png")
        md += [
            "## Tunability: INLP k and α against DiM", "",
            "Harmful refusal rate against harmless perplexity. INLP nullspace and flip for k = 1, 2, 4, 8 and all "
            "(lines, in order of k), flip for α = 0.25, 0.5, 1, 2 at k = all, DiM ablation and actadd as points.", "",
            f"![tunability](results/{plot.name})", "",
            markdown_table(tune_rows), "",
        ]
    if geo_sections:
        md += ["## Geometry: where transformed harmful activations land", "", *geo_sections, ""]
    md += ["## Commands", "", "Every number above comes from these commands (run by `bench/study.py`, in order):", "",
           "```bash", *map(_relative, sorted(meta["commands"], key=_command_order)), "```", ""]
    timings = root / "timings.json"
    if timings.exists():
        md += ["Wall time per step (s): " + ", ".join(f"`{k}` {v}" for k, v in sorted(
            json.loads(timings.read_text()).items(), key=lambda kv: _model_order(kv[0].split("/")[0]))), ""]
    path = docs / "RESULTS.md"
    atomic_write_text(path, "\n".join(md))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"default: the installed ones of {PACKAGED}")
    parser.add_argument("--sweeps", nargs="+", default=SWEEPS, choices=SWEEPS)
    parser.add_argument("--root", type=Path, default=REPO / "study", help="where the runs go")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="enough for the opening refusal phrases")
    parser.add_argument("--n-test", type=int, default=32, help="test prompts per class (0: the data config's)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every step")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)

    models = args.models or [m for m in PACKAGED if installed(m)]
    data = ["data=refusal_direction"] if SPLITS_DIR.is_dir() else ["data=embedded"]
    common = [*data, "logger=none", f"eval.max_new_tokens={args.max_new_tokens}"]
    if args.n_test:
        common.append(f"data.n_test={args.n_test}")
    common += args.override
    meta_path = args.root / "meta.json"
    if args.render_only:
        if not meta_path.exists():
            parser.error(f"--render-only: no {meta_path}; run the study first")
        meta = json.loads(meta_path.read_text())
    else:
        study = Study(args.root, common)
        for model in models:
            study.model(model, args.sweeps)
        info = host_info("cpu")
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
            "hardware": f"{info.get('cpu_count')} × {info.get('cpu')}, torch {info.get('torch')}, no GPU",
            "data": ("the Arditi et al. `refusal_direction` splits (AdvBench-derived harmful, Alpaca harmless), "
                     f"{args.n_test or 'all configured'} test prompts per class"
                     if SPLITS_DIR.is_dir() else "the embedded set (../shared splits not found)"),
            "max_new_tokens": args.max_new_tokens, "models": models, "commands": study.commands,
        }
        if meta_path.exists():  # an earlier invocation ran other models: keep them in the report
            old = json.loads(meta_path.read_text())
            meta["models"] = [*old["models"], *(m for m in models if m not in old["models"])]
            meta["commands"] = [*old["commands"], *(c for c in study.commands if c not in old["commands"])]
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {render(args.root, args.docs, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
