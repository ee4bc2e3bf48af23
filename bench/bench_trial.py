"""Wall time of one lean search trial (what experiment=pareto_* runs per Optuna suggestion), model loaded.

A trial is ``run_evaluation`` with ``eval=trial`` exactly as evaluate.py calls it in a search: config
checks, data and tokenization, the held model, the fitted artifacts read back, the intervention built,
steered greedy generation on the test split's first ``--prompts`` harmful prompts (``--tokens`` new
tokens) judged by the substring judge, and next-token KL on its first ``--prompts`` harmless prompts.
What a search pays once happens before the timing, in an untimed first trial: the model load, the
DiM/INLP fits, the unsteered generations and next-token logits. Each timed trial then steers with a
new value (inlp_flip: α; actadd: the coefficient), so no steered generation comes from the cache.

Target: 32 s per trial, what heretic (the peer tool) took on the same checkpoint in one run set to 32 + 32
prompts and max_response_length=32; a lean trial on that work (--prompts 32 --tokens 32) should be no
slower. heretic-llm 1.4.0's defaults do more per trial: 100 + 100 evaluation prompts and
max_response_length=100 new tokens for the refusal count; its KL, like ours, reads the first generated
token only. ``--peer heretic`` (or abliterix; installed by bench/peers/install.sh) times the peer's own trials
on the same work in the same run (bench/peers/run_peer.py: our model folder, test prompts, budget) and records
the ratio ours ÷ peer, the target then being ≤ 1 on the machine as it is during this run.

Generations and next-token logits go to a temporary cache (the dequantized model is linked in from
REFUSAL_CACHE, so nothing is dequantized again); fits are read from (or written to) the usual
artifacts_dir, except in --smoke, where everything is temporary.

    python bench/bench_trial.py --model qwen05                    # 32 + 32 prompts, 32 tokens, inlp_flip
    python bench/bench_trial.py --model qwen05 --intervention actadd --repeats 5
    python bench/bench_trial.py --model qwen05 --peer heretic    # + heretic's trials on the same work: the ratio
    python bench/bench_trial.py --smoke
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C

NAME = "trial"
#: What each timed trial varies, per intervention: (parameter, first value, step).
VARIED = {"inlp_flip": ("alpha", 0.5, 0.25), "actadd": ("coeff", -0.5, -0.25), "inlp_nullspace": ("k", 0.05, 0.05)}


def link_models(src: Path, dst: Path) -> None:
    """Symlink the dequantized checkpoints of ``src/models`` into ``dst/models`` (as bench_evaluate does)."""
    (dst / "models").mkdir(parents=True, exist_ok=True)
    if (src / "models").is_dir():
        for entry in sorted((src / "models").iterdir()):
            if not entry.name.startswith("."):
                (dst / "models" / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def peer_trial_seconds(peer: str, model: str, prompts: int, tokens: int, trials: int, out: Path) -> list[float]:
    """Wall seconds of each of the peer's own trials on our model, test prompts and budget (bench/peers/run_peer.py),
    as its Optuna study recorded them; the peer's fit and unsteered baseline are not in them, as ours are not."""
    argv = [sys.executable, str(C.REPO / "bench" / "peers" / "run_peer.py"), peer, "--model", model, "--n-test", str(prompts),
            "--max-new-tokens", str(tokens), "--trials", str(trials), "--startup-trials", str(trials), "--out", str(out),
            "--judges", "substring"]
    proc = subprocess.run(argv, cwd=C.REPO, capture_output=True, text=True)
    trials_file = out / "trials.json"
    if proc.returncode != 0 or not trials_file.exists():
        raise SystemExit(f"--peer {peer}: run_peer.py failed ({proc.returncode}):\n{(proc.stderr or proc.stdout)[-2000:]}")
    done = [t for t in json.loads(trials_file.read_text())["trials"] if t.get("state") == "COMPLETE" and t.get("duration_s")]
    if not done:
        raise SystemExit(f"--peer {peer}: no completed trial in {trials_file}")
    return [float(t["duration_s"]) for t in done]


def compose(overrides: list[str]):
    from refusal.schema import compose as compose_config

    return compose_config(C.REPO / "conf", overrides)


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--intervention", default="inlp_flip", choices=sorted(VARIED))
    parser.add_argument("--prompts", type=int, default=32, help="harmful and harmless test prompts per trial (default 32)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per completion (default 32)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for the trial config")
    parser.add_argument("--peer", choices=["heretic", "abliterix"],
                        help="also time the peer's trials on the same work in this run (as many as --repeats)")
    args = C.parse(parser, argv)
    if args.smoke:
        args.prompts, args.tokens = 4, 4
    from refusal.evaluation import run_evaluation
    from refusal.models.held import held_model, release_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_trial_"))
    link_models(C.cache_dir(), tmp / "cache")
    artifacts = tmp / "artifacts" if args.smoke else Path(os.environ.get("REFUSAL_ARTIFACTS") or C.REPO / "artifacts")
    overrides = [f"model={args.model}", "eval=trial", "logger=none", "progress=false", f"data.n_test={args.prompts}",
                 f"eval.max_new_tokens={args.tokens}", f"cache_dir={tmp / 'cache'}", f"artifacts_dir={artifacts}",
                 f"intervention={args.intervention}"]
    if args.smoke:
        overrides += ["data.n_train=16", "data.n_val=8", "fit.dim.n_prompts=4", "fit.dim.positions=last"]
    if args.device:
        overrides.append(f"model.device={args.device}")
    overrides += args.override
    key, first, step = VARIED[args.intervention]
    if key == "k" and first + step * args.repeats > 1:
        parser.error(f"--repeats {args.repeats} would take k (a fraction of the INLP rank) past 1; use at most {int((1 - first) / step)}")
    runs: list[dict[str, Any]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tiny model's "barely refuses" note, once per trial
            t0 = time.perf_counter()
            run_evaluation(compose([*overrides, f"intervention.{key}={first}"]), tmp / "trial_setup")
            setup_s = time.perf_counter() - t0
            print(f"setup (model load, fits, unsteered generations and logits, first trial): {setup_s:.1f}s", flush=True)
            for i in range(args.repeats):
                value = round(first + step * (i + 1), 4)
                cfg = compose([*overrides, f"intervention.{key}={value}"])
                t0 = time.perf_counter()
                results = run_evaluation(cfg, tmp / f"trial_{i}")
                wall = time.perf_counter() - t0
                m, timings = results["metrics"], results["timings"]
                runs.append({"trial": i + 1, key: value, "wall_s": wall, "generate_s": timings.get("generate", 0.0),
                             "score_s": timings.get("score", 0.0), "load_s": timings.get("load", 0.0),
                             "fit_s": timings.get("fit", 0.0), "refusal": m["harmful/refusal_rate"], "kl": m["harmless/kl_div"]})
                print(f"trial {i + 1}: {key}={value} {wall:.1f}s", flush=True)
        from omegaconf import OmegaConf

        device = held_model(OmegaConf.to_container(cfg.model, resolve=True), cfg.cache_dir)[0].device  # the held one
    finally:
        release_model()
        shutil.rmtree(tmp, ignore_errors=True)

    C.print_table(f"lean trials: {args.intervention}, {args.prompts} + {args.prompts} prompts, {args.tokens} tokens, "
                  f"model loaded and fitted (setup {setup_s:.1f}s untimed)", runs)
    walls = [r["wall_s"] for r in runs]
    figures: dict[str, Any] = {
        "intervention": args.intervention, "varied": key, "prompts": args.prompts, "tokens": args.tokens,
        "trial_s": C.median(walls), "trial_min_s": min(walls),
        **{f"{part}_s": C.median(r[f"{part}_s"] for r in runs) for part in ("generate", "score", "load", "fit")},
        "setup_s": setup_s, "repeats": len(runs), "overrides": " ".join(args.override),
    }
    figures.update(C.peak_memory(device))
    if args.peer:
        with tempfile.TemporaryDirectory(prefix="bench_trial_peer_") as peer_dir:
            peer_s = peer_trial_seconds(args.peer, args.model, args.prompts, args.tokens, args.repeats, Path(peer_dir) / "run")
        figures.update({"peer": args.peer, "peer_trial_s": C.median(peer_s), "ratio_vs_peer": figures["trial_s"] / C.median(peer_s)})
        print(f"{args.peer}: {C.median(peer_s):.1f}s per trial (median of {len(peer_s)}); ours ÷ peer "
              f"{figures['ratio_vs_peer']:.2f}", flush=True)
    C.append_row(NAME, args, device, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
