"""Read what an offline W&B run logged, straight from its `run-*.wandb` file (no network, no account).

wandb 0.31 writes offline runs only as a LevelDB-log framed stream of protobuf `Record`s: a 7-byte
file header (":W&B", magic, version), then 32 KiB blocks of [crc32 u32][length u16][type u8][data]
chunks (type 1 full, 2 first, 3 middle, 4 last). Used by tests to prove metrics reached the run.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7


def iter_record_bytes(path: str | Path) -> list[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (bad header)")
    records, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    return records


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """The parts of an offline run that matter for checking what was logged."""

    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def last(self, key: str) -> Any:
        """Last logged value of a history key (e.g. 'test/recall@1'), falling back to the summary."""
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return self.summary.get(key)


def read_offline_run(path: str | Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun()
    for blob in iter_record_bytes(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(blob)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.name = rec.run.display_name or run.name
            run.group = rec.run.run_group or run.group
            run.tags = list(rec.run.tags) or run.tags
            for item in rec.run.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
    return run


def find_offline_runs(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).rglob("offline-run-*/run-*.wandb"))
