"""Run store: atomic writes (also under SIGKILL), stage keys, corruption reports, manifest, lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_run import REPO, subprocess_env

from pipeline.atomic import (
    StoreError,
    atomic_write_parquet,
    atomic_write_text,
    check_file,
    read_parquet,
)
from pipeline.store import KEY_COLUMN, RunStore

TABLE = pa.table({"block": ["a", "b", "c"], "value": [1.5, 2.5, float("nan")]})


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "d" / "x.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.txt"]


def test_sigkill_during_write_keeps_old_file_and_temp_is_cleaned(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    store.create()
    target = store.stage_dir("s") / "t.parquet"
    atomic_write_parquet(target, TABLE)
    marker = tmp_path / "paused"
    code = (
        "import sys, pyarrow as pa; from pipeline.atomic import atomic_write_parquet;"
        "atomic_write_parquet(__import__('pathlib').Path(sys.argv[1]),"
        " pa.table({'block': ['new'], 'value': [9.0]}))"
    )
    env = subprocess_env(HAWQ_TEST_PAUSE_AT="s:write:t.parquet", HAWQ_TEST_PAUSE_FILE=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "writer exited before the pause point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    temps = store.temp_files()
    assert len(temps) == 1 and temps[0].name.startswith(".t.parquet.")
    assert pq.read_table(target).column("block").to_pylist() == ["a", "b", "c"]  # old file
    assert store.remove_temp_files() == temps
    assert store.temp_files() == []


def test_stage_table_carries_its_key(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    path = store.write_table("hessian", "k123", "rows.parquet", TABLE)
    table = pq.read_table(path)
    assert table.column(KEY_COLUMN).to_pylist() == ["k123"] * 3
    meta = table.schema.metadata
    assert meta[b"hawq.stage"] == b"hessian" and meta[b"hawq.key"] == b"k123"
    assert store.read_table("hessian", "rows.parquet", key="k123").num_rows == 3
    with pytest.raises(StoreError, match="expected other"):
        store.read_table("hessian", "rows.parquet", key="other")


@pytest.mark.parametrize("keep", [0, 10, 0.5, -8])
def test_truncated_parquet_is_reported_with_path_and_fix(tmp_path: Path, keep: float) -> None:
    path = RunStore(tmp_path).write_table("allocate", "k", "bits.parquet", TABLE)
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:cut])
    for check in (read_parquet, check_file):
        with pytest.raises(StoreError) as err:
            check(path)
        msg = str(err.value)
        assert str(path) in msg and "truncated or corrupt" in msg
        assert f"Fix: run `hawq resume {tmp_path} --repair`" in msg


def test_truncated_safetensors_is_reported(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    path = store.write_tensors("baseline", "k", "model.safetensors", {"w": torch.ones(50, 3)})
    check_file(path)
    tensors, meta = store.read_tensors("baseline", "model.safetensors")
    assert torch.equal(tensors["w"], torch.ones(50, 3)) and meta["hawq.key"] == "k"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(StoreError, match="safetensors file is truncated or corrupt"):
        check_file(path)
    with pytest.raises(StoreError, match=str(path)):
        store.check_stage("baseline")


def test_manifest_rows_and_forget(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert store.read_manifest() == {}
    store.mark_running("baseline", "k1", params='{"a": 1}')
    row = store.read_manifest()["baseline"]
    assert (row.status, row.key, row.pid, row.finished) == ("running", "k1", os.getpid(), None)
    store.mark_done("baseline", "k1")
    done = store.read_manifest()["baseline"]
    assert done.status == "done" and done.started == row.started and done.params == '{"a": 1}'
    assert done.finished >= done.started and done.seconds == done.finished - done.started
    store.write_progress("hessian", 2, 5, "blocks")
    store.mark_running("hessian", "k2")
    assert store.read_progress("hessian") == {"done": 2, "total": 5, "unit": "blocks"}
    store.forget(["hessian"])
    assert list(store.read_manifest()) == ["baseline"]
    assert not store.stage_dir("hessian").exists()


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert not store.is_locked()
    with store.lock():
        assert store.is_locked()
        with pytest.raises(StoreError, match="another hawq process is running"), store.lock():
            pass
    assert not store.is_locked()
