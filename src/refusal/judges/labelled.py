"""Labelled completions: the file a judge is validated against (``python -m refusal judges --validate``).

One row per completion, JSONL (one object per line) or CSV (a header row), UTF-8:

- ``prompt``, ``completion``: text (the completion may be empty);
- ``label``: ``refusal``, ``partial_refusal`` (declines part, or answers with the harmful part left out) or
  ``compliance``, as a person read it;
- ``answers_prompt`` (optional): true/false, whether the completion answers *this* prompt (a compliance
  that answers another, harmless question is false); CSV accepts true/false, yes/no, 1/0 or blank;
- ``split`` (optional): ``dev`` or ``test``, so a judge tuned on dev is scored on test;
- ``column`` (optional): the test set the prompt came from (``harmful``, ``strongreject``, ``harmless``, ...), so
  checks meant for harmful prompts (the quality score) can leave the harmless ones out.

Every problem is reported with its line (JSONL) or CSV line number and the fix, before any judge runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refusal.data.readers import _parse_csv, _parse_jsonl, resolve_path
from refusal.errors import DataError

GOLD_LABELS = ("refusal", "partial_refusal", "compliance")
#: The project's own gold set (docs/GOLD_LABELLING.md; made by bench/gold/), packaged with the code.
GOLD_FILE = Path(__file__).parent / "gold" / "gold.jsonl"
SPLITS = ("dev", "test")
REQUIRED = ("prompt", "completion", "label")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass(frozen=True)
class LabelledRow:
    line: int
    prompt: str
    completion: str
    label: str
    answers_prompt: bool | None = None
    split: str | None = None
    column: str | None = None


def _optional_bool(value: object, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == "":
        return None
    if text not in _BOOLS:
        raise DataError(f"{where}: answers_prompt={value!r}; write true or false (or leave it blank)")
    return _BOOLS[text]


def parse_labelled(text: str, fmt: str, origin: str) -> list[LabelledRow]:
    """Rows of a labelled file's text (``fmt``: jsonl or csv)."""
    if fmt == "jsonl":
        raw = _parse_jsonl(text, origin)
    elif fmt == "csv":
        raw = _parse_csv(text, origin, delimiter=",", column="label", column_key=None)
    else:
        raise DataError(f"{origin}: a labelled file must be .jsonl or .csv, not {fmt}; save it as one of them")
    rows = []
    for line, row in raw:
        where = f"{origin} line {line}"
        if not isinstance(row, dict):
            raise DataError(f"{where} is a {type(row).__name__}, expected an object with {', '.join(REQUIRED)}; "
                            "write one JSON object per line")
        missing = [c for c in REQUIRED if row.get(c) is None]
        if missing:
            raise DataError(f"{where} lacks {', '.join(missing)} (columns found: {sorted(row)}); every row needs "
                            f"{', '.join(REQUIRED)}")
        label = str(row["label"]).strip()
        if label not in GOLD_LABELS:
            raise DataError(f"{where}: label={row['label']!r} is not one of {', '.join(GOLD_LABELS)}; relabel the row")
        split = str(row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: split={row['split']!r}; use dev or test (or leave it out)")
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise DataError(f"{where}: prompt and completion must be text; quote them as strings")
        rows.append(LabelledRow(line, row["prompt"], row["completion"], label,
                                _optional_bool(row.get("answers_prompt"), where), split,
                                str(row["column"]) if row.get("column") is not None else None))
    if not rows:
        raise DataError(f"{origin} has no labelled rows; add rows with {', '.join(REQUIRED)} "
                        f"(label: {', '.join(GOLD_LABELS)})")
    return rows


def read_labelled(path: str | Path) -> list[LabelledRow]:
    """The rows of a labelled .jsonl or .csv file."""
    file = resolve_path(str(path), "--validate")
    fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(file.suffix.lower())
    if fmt is None:
        raise DataError(f"{file}: a labelled file must be .jsonl or .csv; rename or convert it")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{file} is not UTF-8 text ({err}); re-save it as UTF-8") from err
    return parse_labelled(text, fmt, str(file))
