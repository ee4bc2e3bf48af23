"""How much Arditi's refusal filter turns the per-layer DiM directions: cosine, layer by layer at the last prompt
token, between the direction fitted on the prompts the filter keeps (ours) and on every fit prompt (heretic's
plain mean difference over the same prompt files).

The study's same-parameter table found our heretic-kernel trials refusing 13.5 pts less than heretic's own at the
same kernel parameters on qwen05 and the same on qwen15; the filter keeps 41/128 harmful fit prompts on qwen05
and 112/128 on qwen15. If the filter is what differs, the cosines are well below 1 on qwen05 and near 1 on qwen15.
The filter's decisions are the study's own (``study/artifacts/refusal_scores``: recomputed on another CPU, a
borderline prompt can flip). The embedding output (site 0) is left out: every prompt ends in the same template
token there, so the classes do not differ.

    python bench/filter_direction_cosine.py --models qwen05 qwen15 --splits ../shared/data/refusal_direction_splits

writes ``study/<model>/filter_direction_cosine.json``, which RESULTS' same-parameter table cites.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import refusal
from refusal.artifacts import atomic_write_text
from refusal.fitting.dim import dim_candidates_from_means

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPLITS = REPO.parent / "shared" / "data" / "refusal_direction_splits"


def per_layer_directions(model: str, splits: Path, matmul: str, artifacts: Path, filtered: bool) -> tuple[torch.Tensor, dict]:
    """[n_layers, d_model] unit DiM directions at the last prompt token (index i: block i's output; the last: the
    final norm's input), and what the filter kept."""
    ctx = refusal.load(f"model={model}", "data=refusal_direction", f"data.dir={splits}", f"model.matmul={matmul}",
                       f"artifacts_dir={artifacts}", "logger=none", "progress=false",
                       f"fit.filter_train={str(filtered).lower()}")
    diff = dim_candidates_from_means(ctx.mean("harmful_train"), ctx.mean("harmless_train"))[1:, -1]
    return diff / diff.norm(dim=-1, keepdim=True), ctx.filtered.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["qwen05", "qwen15"])
    parser.add_argument("--splits", type=Path, default=DEFAULT_SPLITS)
    parser.add_argument("--matmul", default="bfloat16", help="the study's products (model.matmul)")
    parser.add_argument("--artifacts", type=Path, default=REPO / "study" / "artifacts",
                        help="where the refusal filter's recorded decisions are (the study's)")
    parser.add_argument("--root", type=Path, default=REPO / "study", help="the study: <root>/<model>/filter_direction_cosine.json")
    args = parser.parse_args()
    for model in args.models:
        ours, kept = per_layer_directions(model, args.splits, args.matmul, args.artifacts, filtered=True)
        plain, _ = per_layer_directions(model, args.splits, args.matmul, args.artifacts, filtered=False)
        cosine = (ours * plain).sum(-1)
        kept_harmful = kept.get("harmful_train", {})
        record = {"kept_harmful_train": kept_harmful, "cosine_by_layer": [round(float(c), 4) for c in cosine]}
        atomic_write_text(args.root / model / "filter_direction_cosine.json", json.dumps(record, indent=1) + "\n")
        print(f"{model}: filter keeps harmful_train {kept_harmful.get('kept')}/{kept_harmful.get('of')}; "
              f"cosine(filtered, unfiltered) at block outputs 0-{len(cosine) - 1}: min {cosine.min():.3f}, median {cosine.median():.3f}, "
              f"max {cosine.max():.3f}")
        print("  " + " ".join(f"{i}:{c:.3f}" for i, c in enumerate(cosine.tolist())))


if __name__ == "__main__":
    main()
