"""The peers' inputs from the project's own sources: the packaged model folder and the study's prompts.

The peers (heretic, abliterix) read prompts as plain text, one per line, and a model as a Hugging Face
checkpoint folder. This module writes both from what the study uses (``data=refusal_direction``, the
same seed and split sizes, through :func:`refusal.data.splits.load_splits`), plus a manifest that maps
every written line back to the study's prompt, so their completions can be judged against ours.

    python bench/peers/peer_inputs.py model-path                # the dequantized qwen05 folder (read only)
    python bench/peers/peer_inputs.py write --out DIR --n-test 100
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SPLITS_DIR = REPO.parent / "shared" / "data" / "refusal_direction_splits"
#: Prompt sets the peers read: (file stem, our split). Fit sets fit their directions, test sets score trials.
SETS = {"harmful_fit": "harmful_train", "harmless_fit": "harmless_train",
        "harmful_test": "harmful_test", "harmless_test": "harmless_test"}
#: A file per set, in a folder of its own: heretic reads the file; abliterix reads the folder with
#: ``datasets.load_dataset(folder, split="train")`` (the text builder: one row per line, column "text").
FILE_NAME = "train.txt"
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


class PeerInputError(ValueError):
    """Inputs the peers cannot be given as they are; the message names the fix."""


def prompt_line(prompt: str) -> str:
    """``prompt`` as one line: each run of line breaks (and the spaces around it) becomes one space,
    since both peers split their prompt files at line breaks."""
    line = _LINE_BREAKS.sub(" ", prompt.strip())
    if not line:
        raise PeerInputError("an empty prompt cannot be written as a line (the peers skip blank lines); "
                             "drop it from the prompt list")
    return line


def write_prompt_file(path: Path, prompts: Sequence[str]) -> list[int]:
    """Write ``prompts`` one per line to ``path`` (atomically); return the indices of the prompts whose
    line breaks had to be replaced (so the peer saw a slightly different text than we did)."""
    from refusal.artifacts import atomic_write_text

    if not prompts:
        raise PeerInputError(f"no prompts to write to {path}; give at least one")
    lines = [prompt_line(p) for p in prompts]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return [i for i, (p, line) in enumerate(zip(prompts, lines, strict=True)) if p.strip() != line]


def read_prompt_file(path: Path) -> list[str]:
    """The prompts as a peer reads them: stripped non-blank lines (heretic's ``load_prompts``)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]  # as `for line in file`


def compose(model: str, n_test: int, splits: Path = SPLITS_DIR, overrides: Sequence[str] = ()) -> Any:
    """The project's Hydra config as the study composes it (``data=refusal_direction``, its seed and sizes;
    a missing splits folder is the project loader's DataError, when the prompts are read)."""
    from refusal.schema import compose as compose_config

    return compose_config(REPO / "conf", [f"model={model}", "data=refusal_direction", f"data.dir={splits}",
                                          f"data.n_test={n_test}", "logger=none", *overrides])


def model_folder(cfg: Any) -> Path:
    """The dequantized checkpoint folder the project's loader uses for ``cfg.model`` (a packaged GGUF
    model), found without writing anything: the peers only read it."""
    model = cfg.model
    if model.source == "local":
        folder = Path(str(model.path)).expanduser()
    elif model.source == "gguf_package":
        folder = Path(str(cfg.cache_dir)).expanduser() / "models" / f"{str(model.gguf.sha256)[:16]}-hf"
    else:
        raise PeerInputError(f"model {model.name} is source={model.source}; the peers run on a local checkpoint "
                             "folder (a packaged model such as qwen05, or model=local with model.path)")
    missing = [name for name in ("config.json", ".complete") if not (folder / name).is_file()]
    if model.source == "local":
        missing = [m for m in missing if m != ".complete"]
    if missing or not any(folder.glob("*.safetensors")):
        raise PeerInputError(
            f"{folder} is not a complete checkpoint folder (missing {missing or ['*.safetensors']}); load the model "
            f"once with the project (python evaluate.py model={model.name} intervention=none data.n_test=1), which "
            "dequantizes and caches it, or pass --cache-dir where it already lies")
    return folder


def write_prompts(out: Path, cfg: Any, n_fit: int | None = None) -> dict[str, Any]:
    """Write the four prompt sets under ``out/prompts`` and ``out/manifest.json``; return the manifest.
    ``n_fit`` keeps the first prompts of each fit set (smoke runs); None keeps the whole train split."""
    from refusal.artifacts import atomic_write_json
    from refusal.data.splits import load_splits

    splits = load_splits(cfg.data)
    lists = splits.lists()
    if n_fit is not None:
        lists = {k: v[:n_fit] if k.endswith("_train") else v for k, v in lists.items()}
    manifest: dict[str, Any] = {"data": splits.source, "data_digest": splits.digest(), "seed": int(cfg.data.seed),
                                "model": str(cfg.model.name), "model_folder": str(model_folder(cfg)), "sets": {}}
    for stem, split in SETS.items():
        path = out / "prompts" / stem / FILE_NAME
        changed = write_prompt_file(path, lists[split])
        manifest["sets"][stem] = {"split": split, "file": str(path.relative_to(out)), "n": len(lists[split]),
                                  "line_breaks_replaced": changed, "prompts": lists[split]}
    manifest["n_fit"] = n_fit
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("model-path", "write"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="qwen05")
        p.add_argument("--n-test", type=int, default=100, help="test prompts per class (the study's --n-test)")
        p.add_argument("--splits", type=Path, default=SPLITS_DIR)
        p.add_argument("--cache-dir", help="the project's cache root (default: $REFUSAL_CACHE or ~/.cache/refusal)")
    sub.choices["write"].add_argument("--out", type=Path, required=True)
    sub.choices["write"].add_argument("--n-fit", type=int, help="first prompts of each fit set (default: all of train)")
    args = parser.parse_args(argv)
    from refusal.errors import RefusalError

    cfg = compose(args.model, args.n_test, args.splits, [f"cache_dir={args.cache_dir}"] if args.cache_dir else [])
    try:
        if args.command == "model-path":
            print(model_folder(cfg))
        else:
            manifest = write_prompts(args.out, cfg, args.n_fit)
            print(json.dumps({k: {"n": v["n"], "line_breaks_replaced": v["line_breaks_replaced"]}
                              for k, v in manifest["sets"].items()}))
    except (PeerInputError, RefusalError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
