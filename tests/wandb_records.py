"""Read the records of an offline W&B run file (``run-*.wandb``) back, to check what was logged.

The file is W&B's 7-byte header followed by LevelDB log-format records (32 KiB blocks, each
record a 7-byte header: CRC32, length, type) holding ``wandb_internal_pb2.Record`` protobufs.
wandb's own Python reader was removed when its core moved to Go, so the tests carry this one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding at a block's end
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0
            continue
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def records(run_dir: Path):
    from wandb.proto import wandb_internal_pb2

    for blob in raw_records(next(Path(run_dir).glob("*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        yield record


def summary(run_dir: Path) -> dict:
    out = {}
    for record in records(run_dir):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def config(run_dir: Path) -> dict:
    out: dict = {}
    for record in records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["_group"] = record.run.run_group
            out["_tags"] = list(record.run.tags)
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        else:
            continue
        for item in items:
            value = json.loads(item.value_json)
            out[item.key] = value["value"] if isinstance(value, dict) and "value" in value else value
    return out
