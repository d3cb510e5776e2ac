"""A stage cache shared by several run dirs (a sweep): each stage key is computed once.

A stage's key hashes its settings, its upstream keys and the hawq version, so two runs whose
keys agree produce the same outputs. ``CACHE/<stage>/<key>/`` holds a finished stage's folder.
Before running a stage, a run restores it from there if present; otherwise it *claims* the key
(``CACHE/<stage>/<key>.lock``, a :class:`pipeline.lock.RunLock`, so a dead claimant's lock is
taken over): the first run computes and publishes the stage, the others wait for the entry and
restore it. Publishing copies to a temp folder and renames it into place (atomic).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.atomic import StoreError, atomic_write_json
from pipeline.lock import RunLock
from pipeline.store import RunStore

log = logging.getLogger(__name__)

PRODUCER = ".producer.json"  # who computed an entry (run dir, time)


class StageCache:
    """The cache at ``root`` (created on first publish)."""

    def __init__(self, root: str | os.PathLike[str], poll_s: float = 1.0) -> None:
        self.root = Path(root)
        self.poll_s = poll_s

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def producer(self, stage: str, key: str) -> dict | None:
        """Who computed the entry (``{"run_dir": ..., "time": ...}``), if it exists."""
        path = self.entry(stage, key) / PRODUCER
        return json.loads(path.read_text()) if path.exists() else None

    def restore(self, store: RunStore, stage: str, key: str) -> bool:
        """Copy the cached stage folder into ``store`` (replacing any partial one) if present."""
        entry = self.entry(stage, key)
        if not entry.is_dir():
            return False
        target = store.stage_dir(stage)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(entry, target, ignore=shutil.ignore_patterns(PRODUCER))
        log.info("%s: restored from the stage cache (key %s)", stage, key)
        return True

    def publish(self, store: RunStore, stage: str, key: str) -> None:
        """Copy ``store``'s finished stage folder into the cache (no-op if already there)."""
        entry = self.entry(stage, key)
        if entry.exists():
            return
        tmp = entry.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(store.stage_dir(stage), tmp)
        atomic_write_json(tmp / PRODUCER, {"run_dir": str(store.root), "time": time.time()})
        try:
            os.rename(tmp, entry)
        except OSError:  # another run published it first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.info("%s: published to the stage cache (key %s)", stage, key)

    @contextlib.contextmanager
    def claim(self, store: RunStore, stage: str, key: str) -> Iterator[bool]:
        """Yield True if the stage was restored (computed by another run meanwhile), else
        False while holding the key's claim: compute it, then :meth:`publish`."""
        if self.restore(store, stage, key):
            yield True
            return
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.root / stage / f"{key}.lock")
        waited = False
        while True:
            try:
                lock.acquire()
                break
            except StoreError:
                if not waited:
                    log.info("%s: another run computes key %s; waiting for it", stage, key)
                    waited = True
                time.sleep(self.poll_s)
                if self.restore(store, stage, key):
                    yield True
                    return
        try:
            if self.restore(store, stage, key):  # published between our checks
                yield True
            else:
                yield False
        finally:
            lock.release()
