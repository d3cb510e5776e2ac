"""The run directory: layout, stage outputs stamped with their key, the manifest, the lock.

Layout::

    RUN_DIR/
      config.yaml          the resolved config of the last run (``hawq resume`` reads it)
      identity.json        model config + data fingerprint the dir was made for
      manifest.parquet     one row per stage: stage, key, status, started, finished, seconds, ...
      lock                 exists while a run is in progress: host/pid/job id (pipeline.lock)
      stages/<stage>/...   the stage's Parquet tables, safetensors, YAML, progress.json
      slurm/               reserved for the Slurm launcher (submitted configs, job ids, logs);
                           a dir holding only this may still become a new run dir

All writes are atomic (:mod:`pipeline.atomic`). Every Parquet table a stage writes carries its
stage key in the schema metadata (``hawq.stage``, ``hawq.key``) and in a ``stage_key`` column.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from pipeline.atomic import (
    TEMP_SUFFIX,
    StoreError,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_tensors,
    check_file,
    read_parquet,
    read_tensors,
)
from pipeline.lock import RunLock

__all__ = ["KEY_COLUMN", "MANIFEST", "ManifestRow", "RunStore", "StoreError"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
CONFIG = "config.yaml"
IDENTITY = "identity.json"
LOCK = "lock"
STAGES = "stages"
LAUNCH_DIR = "slurm"
KEY_COLUMN = "stage_key"

MANIFEST_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("started", pa.float64()),
        ("finished", pa.float64()),
        ("seconds", pa.float64()),
        ("pid", pa.int64()),
        ("host", pa.string()),
        ("params", pa.string()),
    ]
)


@dataclass(frozen=True, kw_only=True)
class ManifestRow:
    """The manifest's record of one stage."""

    stage: str
    key: str
    status: str  # "running" | "done"
    started: float
    finished: float | None = None
    seconds: float | None = None
    pid: int | None = None
    host: str | None = None
    params: str | None = None  # JSON of the settings the key hashes (to explain re-runs)


# --------------------------------------------------------------------------- the run directory


class RunStore:
    """A run directory. Construct with :meth:`open` (existing or new) after validation."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- paths
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def identity_path(self) -> Path:
        return self.root / IDENTITY

    def stage_dir(self, stage: str) -> Path:
        """``stages/<stage>/`` (not created)."""
        return self.root / STAGES / stage

    # ---- lifecycle
    def exists(self) -> bool:
        """True if this looks like a hawq run dir (has a config or a manifest)."""
        return self.config_path.exists() or self.manifest_path.exists()

    def create(self) -> None:
        """Create the directory skeleton (call only after all validation passed)."""
        (self.root / STAGES).mkdir(parents=True, exist_ok=True)

    def remove_temp_files(self) -> list[Path]:
        """Delete dot-prefixed ``*.tmp`` files a killed writer left behind; return them."""
        removed = []
        if not self.root.exists():
            return removed
        for tmp in self.root.rglob(f".*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        if removed:
            log.info("removed %d temp file(s) left by an interrupted run", len(removed))
        return removed

    def temp_files(self) -> list[Path]:
        """Temp files currently present (for tests and ``status``)."""
        return sorted(self.root.rglob(f".*{TEMP_SUFFIX}")) if self.root.exists() else []

    # ---- lock
    def lock(self) -> RunLock:
        """The run lock on ``RUN_DIR/lock`` (hold it with ``with``; stale locks are taken over)."""
        return RunLock(self.root / LOCK)

    def is_locked(self) -> bool:
        """True if a live process (or running Slurm job) holds the run lock."""
        return RunLock(self.root / LOCK).holder() is not None

    # ---- manifest
    def read_manifest(self) -> dict[str, ManifestRow]:
        """Stage name -> its manifest row (empty if no manifest yet)."""
        if not self.manifest_path.exists():
            return {}
        table = read_parquet(self.manifest_path)
        rows = {}
        for rec in table.to_pylist():
            rows[rec["stage"]] = ManifestRow(**{f: rec.get(f) for f in MANIFEST_SCHEMA.names})
        return rows

    def _write_manifest(self, rows: Mapping[str, ManifestRow]) -> None:
        recs = [{f: getattr(r, f) for f in MANIFEST_SCHEMA.names} for r in rows.values()]
        atomic_write_parquet(self.manifest_path, pa.Table.from_pylist(recs, schema=MANIFEST_SCHEMA))

    def mark_running(self, stage: str, key: str, params: str | None = None) -> None:
        """Record that ``stage`` started (or restarted) with ``key``."""
        rows = self.read_manifest()
        prev = rows.get(stage)
        started = prev.started if prev and prev.key == key and prev.status == "running" else None
        rows[stage] = ManifestRow(
            stage=stage,
            key=key,
            status="running",
            started=started or time.time(),
            pid=os.getpid(),
            host=socket.gethostname(),
            params=params,
        )
        self._write_manifest(rows)

    def mark_done(self, stage: str, key: str) -> None:
        """Record that ``stage`` finished with ``key``."""
        rows = self.read_manifest()
        prev = rows.get(stage)
        now = time.time()
        started = prev.started if prev and prev.key == key else now
        rows[stage] = ManifestRow(
            stage=stage,
            key=key,
            status="done",
            started=started,
            finished=now,
            seconds=now - started,
            pid=os.getpid(),
            host=socket.gethostname(),
            params=prev.params if prev else None,
        )
        self._write_manifest(rows)

    def forget(self, stages: list[str]) -> None:
        """Drop manifest rows (stages to be recomputed) and their outputs."""
        rows = self.read_manifest()
        for stage in stages:
            rows.pop(stage, None)
            shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        self._write_manifest(rows)

    # ---- stage outputs
    def stage_files(self, stage: str) -> Iterator[Path]:
        """The stage's stored files (temp files excluded), sorted."""
        d = self.stage_dir(stage)
        if d.exists():
            yield from sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))

    def check_stage(self, stage: str) -> None:
        """Raise :class:`StoreError` naming the first corrupt file of ``stage``."""
        for path in self.stage_files(stage):
            check_file(path)

    def write_table(self, stage: str, key: str, name: str, table: pa.Table) -> Path:
        """Write ``stages/<stage>/<name>`` with the stage key as a column and in the metadata."""
        if KEY_COLUMN in table.column_names:
            table = table.drop_columns([KEY_COLUMN])
        table = table.append_column(KEY_COLUMN, pa.array([key] * table.num_rows, pa.string()))
        meta = dict(table.schema.metadata or {})
        meta.update({b"hawq.stage": stage.encode(), b"hawq.key": key.encode()})
        path = self.stage_dir(stage) / name
        atomic_write_parquet(path, table.replace_schema_metadata(meta))
        return path

    def read_table(self, stage: str, name: str, key: str | None = None) -> pa.Table:
        """Read a stage table; with ``key``, refuse one written under another key."""
        path = self.stage_dir(stage) / name
        table = read_parquet(path)
        found = (table.schema.metadata or {}).get(b"hawq.key", b"").decode()
        if key is not None and found != key:
            raise StoreError(
                f"{path}: written by stage key {found or '(none)'}, expected {key}. "
                f"Fix: delete it and run `hawq resume {self.root}`."
            )
        return table

    def write_tensors(
        self, stage: str, key: str, name: str, tensors: Mapping[str, torch.Tensor], **meta: str
    ) -> Path:
        """Write ``stages/<stage>/<name>`` (safetensors) with the stage key in its metadata."""
        path = self.stage_dir(stage) / name
        atomic_write_tensors(path, tensors, {"hawq.stage": stage, "hawq.key": key, **meta})
        return path

    def read_tensors(self, stage: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Read a stage safetensors file and its metadata."""
        return read_tensors(self.stage_dir(stage) / name)

    def write_json(self, stage: str, name: str, obj: Any) -> Path:
        path = self.stage_dir(stage) / name
        atomic_write_json(path, obj)
        return path

    def write_progress(self, stage: str, done: int, total: int, unit: str) -> None:
        """Record progress inside a running stage (``hawq status`` shows it)."""
        self.write_json(stage, "progress.json", {"done": done, "total": total, "unit": unit})

    def read_progress(self, stage: str) -> dict | None:
        path = self.stage_dir(stage) / "progress.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None
