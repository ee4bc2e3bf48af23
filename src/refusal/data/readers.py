"""Read instruction lists from JSON, JSONL, CSV or plain-text files.

Users bring their own prompt files in whatever shape they have; every parse problem is turned
into a :class:`DataError` naming the file, the line and the config key that pointed at it, so a
bad file is fixed in one go instead of surfacing as a KeyError deep in a run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from refusal.errors import DataError

FORMATS = ("json", "jsonl", "csv", "tsv", "txt")
_SUFFIXES = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "txt",
}


def resolve_path(value: str, key: str, *, want_dir: bool = False) -> Path:
    """Absolute path for a config value; missing paths name the config key that set them."""
    path = Path(value).expanduser().resolve()
    kind = "folder" if want_dir else "file"
    if not path.exists():
        raise DataError(f"{kind} not found: {path} (set by {key}); point {key} at an existing {kind}")
    if want_dir and not path.is_dir():
        raise DataError(f"{path} is not a folder (set by {key}); point {key} at the folder holding the files")
    if not want_dir and path.is_dir():
        raise DataError(
            f"{path} is a folder, expected a file (set by {key}); point {key} at a .json/.jsonl/.csv file"
        )
    return path


def read_instructions(path: Path, column: str, *, key: str, column_key: str | None = None) -> list[str]:
    """Instructions from ``path`` (existing file). ``key``/``column_key`` name config keys for errors."""
    origin = f"{path} (set by {key})"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{origin} is not UTF-8 text ({err}); re-save it as UTF-8") from err
    return parse_instructions(text, detect_format(path, text), column, origin=origin, column_key=column_key)


def detect_format(path: Path, text: str) -> str:
    """Format from the suffix, else from the first character (``[`` JSON, ``{`` JSONL)."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is not None:
        return fmt
    head = text.lstrip()[:1]
    if head == "[":
        return "json"
    if head == "{":
        return "jsonl"
    raise DataError(
        f"cannot tell the format of {path}; rename it with one of the suffixes {sorted(_SUFFIXES)}"
    )


def parse_instructions(
    text: str, fmt: str, column: str, *, origin: str, column_key: str | None = None
) -> list[str]:
    """Stripped, non-empty instructions in file order (duplicates kept: the splitter counts them)."""
    if fmt == "json":
        rows = _parse_json(text, origin)
    elif fmt == "jsonl":
        rows = _parse_jsonl(text, origin)
    elif fmt in ("csv", "tsv"):
        rows = _parse_csv(
            text, origin, delimiter="\t" if fmt == "tsv" else ",", column=column, column_key=column_key
        )
    elif fmt == "txt":
        rows = [(i, line) for i, line in enumerate(text.splitlines(), start=1)]
    else:
        raise DataError(f"unknown format {fmt!r} for {origin}; use one of {FORMATS}")
    out = _extract(rows, column, origin, column_key)
    if not out:
        raise DataError(
            f"{origin} contains no instructions (empty, or every '{column}' value is blank); "
            "add rows or point the config at another file"
        )
    return out


def _parse_json(text: str, origin: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text, origin)  # JSON Lines saved as .json
        raise DataError(
            f"{origin} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; "
            "fix the file (a JSON list of objects or strings, or one object per line as .jsonl)"
        ) from err
    if not isinstance(data, list):
        raise DataError(
            f"{origin} holds a JSON {type(data).__name__}, expected a list of objects or strings; "
            "wrap the rows in [...] or save them one per line as .jsonl"
        )
    return [(i, row) for i, row in enumerate(data, start=1)]


def _parse_jsonl(text: str, origin: str) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{origin}: line {lineno} is not valid JSON ({err.msg}); "
                "fix that line (JSONL needs one JSON object or string per line)"
            ) from err
    return rows


def _parse_csv(
    text: str, origin: str, *, delimiter: str, column: str, column_key: str | None
) -> list[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, Any]] = []
    try:
        fields = reader.fieldnames
        if fields is not None and column not in fields:
            raise DataError(_missing_column(origin, column, fields, column_key, where="header"))
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise DataError(
            f"{origin}: CSV parse error at line {reader.line_num} ({err}); fix the quoting on that line"
        ) from err
    return rows


def _extract(rows: Iterable[tuple[int, Any]], column: str, origin: str, column_key: str | None) -> list[str]:
    """Pull ``column`` out of object rows (plain strings pass through).

    Rows whose ``input`` field is non-empty are skipped, as Arditi et al. do for Alpaca: such an
    instruction refers to text the model would never see.
    """
    out: list[str] = []
    for where, row in rows:
        if isinstance(row, dict):
            if column not in row:
                raise DataError(_missing_column(origin, column, list(row), column_key, where=f"row {where}"))
            if column != "input" and isinstance(row.get("input"), str) and row["input"].strip():
                continue
            value = row[column]
        else:
            value = row
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{origin}: row {where} has a {type(value).__name__} where text was expected "
                f"({value!r:.60}); make every instruction a string"
            )
        value = value.strip()
        if value:
            out.append(value)
    return out


def _missing_column(origin: str, column: str, found: list[Any], column_key: str | None, *, where: str) -> str:
    fix = f"set {column_key} to one of them" if column_key else "rename the field"
    return f"{origin}: {where} has no column '{column}'; columns found: {[str(c) for c in found]}; {fix}"
