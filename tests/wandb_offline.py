"""Read what an offline W&B run logged, straight from its `run-*.wandb` file (no network, no account).

wandb 0.31 writes offline runs only as a LevelDB-log framed stream of protobuf `Record`s: a 7-byte
file header (":W&B", magic, version), then 32 KiB blocks of [crc32 u32][length u16][type u8][data]
chunks (type 1 full, 2 first, 3 middle, 4 last). Used by tests to prove metrics reached the run.

Tables (and the images in their cells) are logged as `run_table` artifacts: the record holds the manifest,
whose files are staged on disk (under $WANDB_DATA_DIR/artifacts/staging) until `wandb sync` uploads them;
`OfflineRun.table(key)` reads a logged table back from there.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

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
class OfflineArtifact:
    """An artifact the run logged: its files map a path inside the artifact to the staged local copy."""

    name: str
    type: str
    aliases: list[str]
    client_id: str
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class OfflineRun:
    """The parts of an offline run that matter for checking what was logged."""

    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # define_metric: name or glob -> options
    artifacts: list[OfflineArtifact] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # files saved with the run (paths under its files/)
    path: Path | None = None
    exited: bool = False  # the file holds the run's exit record: everything it logged is in it

    def last(self, key: str) -> Any:
        """Last logged value of a history key (e.g. 'test/recall@1'), falling back to the summary."""
        for row in reversed(self.history):
            if key in row:
                return row[key]
        return self.summary.get(key)

    def table(self, key: str) -> dict[str, Any] | None:
        """The table logged under `key` as W&B wrote it ({"columns", "data", ...}; image cells are dicts with
        "_type": "image-file", "path", "width", "height", ...), read from its staged run_table artifact."""
        for row in reversed(self.history):
            ref = row.get(f"{key}/artifact_path")
            if row.get(f"{key}/_type") != "table-file" or not ref:
                continue
            client_id, _, inner = ref.removeprefix("wandb-client-artifact://").partition("/")
            for art in self.artifacts:
                if art.client_id == client_id and inner in art.files:
                    return json.loads(Path(art.files[inner]).read_text())
        return None

    def artifact_file(self, artifact: OfflineArtifact, path: str) -> Path:
        return Path(artifact.files[path])


def read_offline_run(path: str | Path, wait_s: float = 30.0) -> OfflineRun:
    """The finished run in `path`: read again (every 0.2 s, up to `wait_s`) until its file holds the exit record.
    wandb's writer may still be flushing the last records (the test-end image and table) when the process that
    logged them has returned from `wandb.finish()` on a loaded machine; a run read then would lack them."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = _parse_offline_run(path)
        except DecodeError:  # a record cut off mid-write
            run = None
        if run is not None and run.exited:
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {wait_s:g} s (the W&B run did not finish)")
        time.sleep(0.2)


def _parse_offline_run(path: str | Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    run = OfflineRun(path=Path(path))
    for blob in iter_record_bytes(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(blob)
        kind = rec.WhichOneof("record_type")
        if kind == "exit":
            run.exited = True
        elif kind == "run":
            run.name = rec.run.display_name or run.name
            run.group = rec.run.run_group or run.group
            run.tags = list(rec.run.tags) or run.tags
            run.job_type = rec.run.job_type or run.job_type
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
        elif kind == "metric":
            m = rec.metric
            summary = [f.name for f, on in m.summary.ListFields() if on is True]
            run.metrics[m.name or m.glob_name] = {"step_metric": m.step_metric, "summary": summary}
        elif kind == "artifact":
            a = rec.artifact
            run.artifacts.append(OfflineArtifact(a.name, a.type, list(a.aliases), a.client_id,
                                                 {c.path: c.local_path for c in a.manifest.contents}))
        elif kind == "files":
            run.files.extend(f.path for f in rec.files.files)
    return run


def find_offline_runs(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).rglob("offline-run-*/run-*.wandb"))
