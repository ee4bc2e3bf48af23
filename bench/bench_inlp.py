"""Time ``fit_inlp`` (Lightning, L-BFGS) against the scikit-learn reference INLP.

On planted data both run exactly ``--iters`` iterations by default (``--epsilon -1`` disables the
early stop, so the per-iteration cost is compared like for like); ``n_useful`` is still reported
for the usual threshold chance + 0.02. ``--model`` instead takes the study's own INLP problem (the
cached activations of a packaged model at its DiM layer, all post-instruction positions) and runs
both to convergence (chance + 0.02, cap 300), so time and accuracy are compared at the rank the
study uses. Appends one row per run to ``bench/results/inlp.csv``.

    python bench/bench_inlp.py                  # planted 4096 x 1536, 16 iterations
    python bench/bench_inlp.py --model qwen05   # the study's qwen05 problem, to convergence
    python bench/bench_inlp.py --smoke          # 512 x 64, 6 iterations, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _common import REPO, write_row

sys.path.insert(0, str(REPO / "tests"))  # the scikit-learn oracle is test code: tests/reference/
from reference.inlp_reference import fit_inlp_reference, make_planted_concept  # noqa: E402

from refusal.fitting.inlp import INLPConfig, INLPResult, fit_inlp, n_useful_of

RESULTS = Path(__file__).resolve().parent / "results" / "inlp.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="training rows (the held-out set has as many)")
    ap.add_argument("--d", type=int, default=1536, help="activation width")
    ap.add_argument("--iters", type=int, default=16, help="INLP iterations")
    ap.add_argument("--k", type=int, default=8, help="dimension of the planted concept")
    ap.add_argument("--classifier", default="logistic", choices=["logistic", "svm"])
    ap.add_argument("--epsilon", type=float, default=-1.0, help="early-stop margin; -1 runs all iterations")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="small and fast: 512 x 64, 6 iterations, k=3")
    ap.add_argument("--model", default=None, help="fit the study's INLP problem on this packaged model, to convergence")
    ap.add_argument("--override", nargs="*", default=[], help="Hydra overrides for --model (default: the study's data)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.d, args.iters, args.k = 512, 64, 6, 3
    if args.model:
        args.iters, args.epsilon, args.k = 300, (0.02 if args.epsilon < 0 else args.epsilon), 0
    return args


def study_problem(model: str, overrides: list[str]) -> tuple[torch.Tensor, ...]:
    """The INLP training and held-out data the study fits on ``model`` (DiM layer from its artifact)."""
    from refusal.context import prepare
    from refusal.fits import _inlp_data, fit_dim, inlp_settings
    from refusal.schema import compose

    splits = Path(__file__).resolve().parents[2] / "shared" / "data" / "refusal_direction_splits"
    data = ["data=refusal_direction", f"data.dir={splits}", "data.n_test=32"] if splits.is_dir() else []
    cfg = compose(Path(__file__).resolve().parents[1] / "conf",
                  [f"model={model}", *data, "logger=none", "progress=false", *overrides])
    ctx = prepare(cfg)
    dim = fit_dim(ctx)
    positions = inlp_settings(ctx)[0]
    return (*_inlp_data(ctx, "train", dim.layer, dim.position, positions),
            *_inlp_data(ctx, "val", dim.layer, dim.position, positions))


def timed(fn, *args, **kwargs) -> tuple[INLPResult, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _fmt(accs: list[float]) -> str:
    return ";".join(f"{a:.4f}" for a in accs)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.model:
        X, y, X_val, y_val = study_problem(args.model, args.override)
        args.n, args.d = X.shape
    else:
        X, y, X_val, y_val, _ = make_planted_concept(args.n, args.d, args.k, seed=args.seed)
    cfg = INLPConfig(n_iterations=args.iters, classifier=args.classifier, epsilon=args.epsilon,
                     seed=args.seed, accelerator=args.accelerator)

    # Warm-up on a toy problem so one-off import / first-Trainer costs are not billed to the run.
    toy = make_planted_concept(64, 8, 1, seed=1)
    fit_inlp(*toy[:4], INLPConfig(n_iterations=1, epsilon=1.0, accelerator=args.accelerator), enable_progress_bar=False)

    ours, t_ours = timed(fit_inlp, X, y, X_val, y_val, cfg, enable_progress_bar=False)
    ref, t_ref = timed(fit_inlp_reference, X, y, X_val, y_val, n_iterations=args.iters,
                       classifier=args.classifier, epsilon=args.epsilon, seed=args.seed, l2=cfg.l2)

    k = min(ours.rank, ref.rank)
    cos = (ours.directions[:k] * ref.directions[:k]).sum(1)
    # Late INLP directions are fitted on nearly chance-level data, so small differences early on rotate them
    # within the subspace: compare the subspaces too (mean squared cosine of the principal angles; 1 = same span).
    overlap = float((ours.directions[:k].double() @ ref.directions[:k].double().T).pow(2).sum()) / k
    agree = int(next((i for i, c in enumerate(cos.abs().tolist()) if c < 0.99), k))
    useful = {name: n_useful_of(r.val_accuracy, r.chance + 0.02, r.rank) for name, r in (("ours", ours), ("ref", ref))}
    n_common = min(len(ours.val_accuracy), len(ref.val_accuracy))
    max_diff = max(abs(a - b) for a, b in zip(ours.val_accuracy[:n_common], ref.val_accuracy[:n_common], strict=True))
    row = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "problem": f"{args.model} study INLP" if args.model else "planted",
        "n": args.n, "d": args.d, "iters": args.iters, "k_planted": args.k, "classifier": args.classifier,
        "epsilon": args.epsilon, "accelerator": args.accelerator,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
        "python": platform.python_version(), "torch": torch.__version__,
        "fit_inlp_s": round(t_ours, 3), "reference_s": round(t_ref, 3), "speedup_ref_over_ours": round(t_ref / t_ours, 2),
        "iters_ours": len(ours.val_accuracy), "iters_ref": len(ref.val_accuracy),
        "n_useful_ours": useful["ours"], "n_useful_ref": useful["ref"], "chance": round(ours.chance, 4),
        "max_abs_val_acc_diff": round(max_diff, 4),
        "min_cos_useful_dirs": round(float(cos[: max(1, min(useful.values()))].min()), 5),
        "leading_dirs_agreeing": agree, "subspace_overlap": round(overlap, 4),
        "val_acc_ours": _fmt(ours.val_accuracy), "val_acc_ref": _fmt(ref.val_accuracy),
    }

    shape = f"cap {args.iters}, epsilon {args.epsilon}" if args.model else f"iters={args.iters} planted k={args.k}"
    print(f"INLP bench ({row['problem']}): n={args.n} d={args.d} {shape} classifier={args.classifier} "
          f"(torch threads={row['torch_threads']}, load {row['loadavg_1m']})")
    print(f"  fit_inlp (Lightning, L-BFGS): {t_ours:8.2f} s   rank={ours.rank} n_useful={useful['ours']}")
    print(f"  sklearn reference          : {t_ref:8.2f} s   rank={ref.rank} n_useful={useful['ref']}")
    print(f"  ratio reference / fit_inlp : {t_ref / t_ours:8.2f} x")
    print(f"  chance={ours.chance:.4f}  max |val acc diff|={max_diff:.4f}  "
          f"min cos(useful directions)={row['min_cos_useful_dirs']}")
    print(f"  leading directions with |cos| >= 0.99: {agree} of {k}; subspace overlap (mean cos² of principal angles): {overlap:.4f}")
    print(f"  val acc fit_inlp : {_fmt(ours.val_accuracy)}")
    print(f"  val acc reference: {_fmt(ref.val_accuracy)}")

    write_row(args.out, row)
    print(f"  appended to {args.out}")
    return row


if __name__ == "__main__":
    main()
