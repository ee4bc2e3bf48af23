"""Local data sources: the embedded set, the refusal_direction split folder, and user files.

Each loader turns a data config into a :class:`RawData` (rows per class, no sampling), so
adding a source never touches the split rules. ``hf`` lives in :mod:`refusal.data.hub` because
it alone needs the network and the optional ``datasets`` package.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from refusal.data.hub import load_hf
from refusal.data.pools import Pool, RawData, cfg_str
from refusal.data.readers import parse_instructions, read_instructions, resolve_path
from refusal.errors import DataError

EMBEDDED_FILES = {"harmful": "harmful.jsonl", "harmless": "harmless.jsonl", "overrefusal": "overrefusal.jsonl"}
RD_FILES = ("harmful_train.json", "harmful_val.json", "harmless_train.json", "harmless_val.json")


def load_embedded(cfg: Mapping[str, Any]) -> RawData:
    """The instruction set shipped in the package: works offline, needs no configuration."""
    pools = {label: Pool(train=read_embedded(label)) for label in ("harmful", "harmless")}
    return RawData(harmful=pools["harmful"], harmless=pools["harmless"], source="embedded")


def read_embedded(label: str) -> list[str]:
    """Instructions of one embedded file (``harmful``, ``harmless`` or ``overrefusal``)."""
    name = EMBEDDED_FILES[label]
    ref = resources.files("refusal.data").joinpath("embedded", name)
    try:
        text = ref.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(
            f"embedded data file {name} is missing from the installed package; reinstall refusal "
            "(pip install -e .) or use data=files"
        ) from err
    return parse_instructions(text, "jsonl", "instruction", origin=f"embedded/{name}")


def read_embedded_rows(label: str) -> list[dict[str, Any]]:
    """Embedded rows with their categories (for reports and tests)."""
    ref = resources.files("refusal.data").joinpath("embedded", EMBEDDED_FILES[label])
    return [json.loads(line) for line in ref.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_refusal_direction(cfg: Mapping[str, Any]) -> RawData:
    """The splits of Arditi et al.'s refusal_direction repo: ``*_train.json`` and ``*_val.json``.

    Train comes from the train files only; the val files are held out for val/test so results
    stay comparable with the paper's evaluation prompts.
    """
    folder = resolve_path(
        cfg_str(cfg, "dir", required_by="data=refusal_direction"), "data.dir", want_dir=True
    )
    missing = [name for name in RD_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"{folder} (set by data.dir) lacks {', '.join(missing)}; point data.dir at a folder with "
            f"{', '.join(RD_FILES)}"
        )

    def rows(name: str) -> list[str]:
        return read_instructions(folder / name, "instruction", key="data.dir")

    pools = {
        label: Pool(train=rows(f"{label}_train.json"), held_out=rows(f"{label}_val.json"))
        for label in ("harmful", "harmless")
    }
    return RawData(harmful=pools["harmful"], harmless=pools["harmless"], source=f"refusal_direction:{folder}")


def load_files(cfg: Mapping[str, Any]) -> RawData:
    """One user file per class (JSON, JSONL, CSV, TSV or TXT), pooled and split by the splitter."""
    column = cfg_str(cfg, "column", "instruction", required_by="data=files")
    pools: dict[str, Pool] = {}
    paths = []
    for label in ("harmful", "harmless"):
        key = f"data.{label}_path"
        path = resolve_path(cfg_str(cfg, f"{label}_path", required_by="data=files"), key)
        pools[label] = Pool(train=read_instructions(path, column, key=key, column_key="data.column"))
        paths.append(str(path))
    return RawData(harmful=pools["harmful"], harmless=pools["harmless"], source="files:" + "+".join(paths))


LOADERS: dict[str, Callable[[Mapping[str, Any]], RawData]] = {
    "embedded": load_embedded,
    "refusal_direction": load_refusal_direction,
    "hf": load_hf,
    "files": load_files,
}
