"""The run lock without flock: O_EXCL file with host/pid/job id; stale holders are taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pipeline.lock as lock_mod
from pipeline.atomic import StoreError
from pipeline.lock import RunLock, holder_info, process_start
from pipeline.store import RunStore


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_holder(path: Path, **fields) -> dict:
    holder = {**holder_info(), **fields}
    path.write_text(json.dumps(holder))
    return holder


def test_lock_file_names_its_holder_and_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    store = RunStore(tmp_path)
    with store.lock():
        holder = json.loads((tmp_path / "lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["job_id"] == "4242" and holder["start"] == process_start(os.getpid())
        assert store.is_locked()
    assert not (tmp_path / "lock").exists() and not store.is_locked()


def test_live_lock_is_refused_naming_the_holder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_holder(tmp_path / "lock", pid=sleeper.pid, start=process_start(sleeper.pid))
        with pytest.raises(StoreError, match=f"pid {sleeper.pid} on {socket.gethostname()}"):
            RunStore(tmp_path).lock().acquire()
        assert RunStore(tmp_path).is_locked()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder died: now the lock is stale and the next run takes it
    assert not RunStore(tmp_path).is_locked()


def test_dead_pid_on_this_host_is_taken_over_with_a_log_line(tmp_path, caplog):
    pid = _dead_pid()
    _write_holder(tmp_path / "lock", pid=pid, job_id=None)
    assert not RunStore(tmp_path).is_locked()
    with caplog.at_level(logging.WARNING, logger="pipeline.lock"), RunStore(tmp_path).lock():
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert f"taking over the stale run lock of pid {pid}" in caplog.text
    assert "its process is gone" in caplog.text


def test_recycled_pid_is_not_mistaken_for_the_holder(tmp_path, caplog):
    # our own pid, but another start time: the pid was reused by an unrelated process
    _write_holder(tmp_path / "lock", start="1")
    with caplog.at_level(logging.WARNING), RunStore(tmp_path).lock():
        pass
    assert "its process is gone" in caplog.text


def test_holder_on_another_host_is_judged_by_its_slurm_job(tmp_path, caplog):
    lock_path = tmp_path / "lock"
    asked = []

    def job_running(job_id: str) -> bool | None:
        asked.append(job_id)
        return {"77": True, "78": False}.get(job_id)

    _write_holder(lock_path, host="node-elsewhere", pid=1, job_id="77")
    with pytest.raises(StoreError, match="pid 1 on node-elsewhere, Slurm job 77"):
        RunLock(lock_path, job_running).acquire()
    _write_holder(lock_path, host="node-elsewhere", pid=1, job_id="79")  # unknown: live
    with pytest.raises(StoreError, match="Slurm job 79"):
        RunLock(lock_path, job_running).acquire()
    _write_holder(lock_path, host="node-elsewhere", pid=1, job_id=None)  # cannot tell: live
    with pytest.raises(StoreError, match="if it is gone, delete"):
        RunLock(lock_path, job_running).acquire()
    _write_holder(lock_path, host="node-elsewhere", pid=1, job_id="78")
    with caplog.at_level(logging.WARNING), RunLock(lock_path, job_running):
        pass
    assert "Slurm job 78 is no longer running" in caplog.text
    assert asked == ["77", "79", "78"]


def test_requeued_job_takes_over_its_earlier_incarnation(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    _write_holder(tmp_path / "lock", host="n1-old", pid=1, job_id="55")
    with caplog.at_level(logging.WARNING), RunLock(tmp_path / "lock", lambda j: True):
        pass
    assert "an earlier incarnation of this (requeued) job" in caplog.text


# a taker process: per line on stdin (a lock path and a go file), argv[1] threads that wait
# for the go file and take the lock; it prints how many won and holds the lock until told
_TAKER = """
import sys, threading
from pathlib import Path
from test_lock import _take

print("ready", flush=True)
for line in sys.stdin:
    lock_path, go = map(Path, line.split())
    held = []
    threads = [threading.Thread(target=_take, args=(lock_path, go, held))
               for _ in range(int(sys.argv[1]))]
    for t in threads:
        t.start()
    print("armed", flush=True)
    for t in threads:
        t.join()
    print(len(held), flush=True)
    sys.stdin.readline()  # hold a won lock until the test has seen every taker's result
    for lock in held:
        lock.release()
    print("released", flush=True)
"""


def test_only_one_of_many_concurrent_takers_wins(tmp_path):
    """Rounds of 3 processes x 8 threads + 8 threads here, started together on one stale
    lock: exactly one wins each round (the others find its live lock, or give up contended),
    the lock names the winner, no takeover marker is left, and the winner's release frees it."""
    takers, rounds = 8, 20
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TAKER, str(takers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline() == "ready\n"
        for n in range(rounds):
            lock_path, go = tmp_path / f"run{n}" / "lock", tmp_path / f"go{n}"
            lock_path.parent.mkdir()
            _write_holder(lock_path, pid=_dead_pid())
            for proc in procs:
                proc.stdin.write(f"{lock_path} {go}\n")
                proc.stdin.flush()
            for proc in procs:
                assert proc.stdout.readline() == "armed\n"
            here: list[RunLock] = []
            threads = [
                threading.Thread(target=_take, args=(lock_path, go, here)) for _ in range(takers)
            ]
            for t in threads:
                t.start()
            go.touch()
            won = [(proc.pid, int(proc.stdout.readline())) for proc in procs]
            for t in threads:
                t.join()
            won.append((os.getpid(), len(here)))
            assert sum(w for _, w in won) == 1, f"round {n}: winners per pid {won}"
            (winner,) = [pid for pid, w in won if w]
            assert json.loads(lock_path.read_text())["pid"] == winner
            assert [p.name for p in lock_path.parent.iterdir()] == ["lock"]  # no marker left
            for proc in procs:
                proc.stdin.write("release\n")
                proc.stdin.flush()
                assert proc.stdout.readline() == "released\n"
            for lock in here:
                lock.release()
            assert not lock_path.exists()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _take(lock_path: Path, go: Path, held: list[RunLock]) -> None:
    lock = RunLock(lock_path)
    while not go.exists():
        time.sleep(0.0005)
    try:
        lock.acquire()
    except StoreError:
        return
    held.append(lock)


def test_an_abandoned_takeover_marker_is_passed_and_a_live_one_waited_for(
    tmp_path, monkeypatch, caplog
):
    """A taker that died while taking over left its marker: the next taker passes it, takes
    the lock over and removes the marker. A live taker's marker (here: this process's) makes
    others wait and, while it stays, give up as contended; once it is old, it is passed."""
    lock_path = tmp_path / "lock"
    _write_holder(lock_path, pid=_dead_pid())
    identity = lock_mod.snapshot(lock_path)[0]
    marker = lock_mod.takeover_marker(lock_path, lock_mod.takeover_key(identity))
    _write_holder(marker, pid=os.getpid())  # live: another thread of ours is taking over
    monkeypatch.setattr(lock_mod, "ACQUIRE_ATTEMPTS", 3)
    with pytest.raises(StoreError, match="could not take the run lock \\(contended\\)"):
        RunLock(lock_path).acquire()
    assert lock_mod.snapshot(lock_path)[0] == identity  # untouched
    old = time.time() - lock_mod.TAKEOVER_STALE_S - 1
    os.utime(marker, (old, old))  # a taker stuck that long has abandoned it
    with caplog.at_level(logging.WARNING), RunLock(lock_path):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]
    assert "its process is gone" in caplog.text
    # a marker whose creator is dead, and the marker that passes it, are both passed
    _write_holder(lock_path, pid=_dead_pid())
    identity = lock_mod.snapshot(lock_path)[0]
    first = lock_mod.takeover_marker(lock_path, lock_mod.takeover_key(identity))
    _write_holder(first, pid=_dead_pid())
    key = lock_mod.takeover_key(lock_mod.snapshot(first)[0], lock_mod.takeover_key(identity))
    _write_holder(lock_mod.takeover_marker(lock_path, key), pid=_dead_pid())
    with RunLock(lock_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]
    assert not lock_path.exists()


def test_unreadable_lock_is_live_only_while_it_may_be_being_written(tmp_path, caplog):
    path = tmp_path / "lock"
    path.write_text("")
    assert RunStore(tmp_path).is_locked()  # just created: its holder is writing it
    old = path.stat().st_mtime - 60
    os.utime(path, (old, old))
    assert not RunStore(tmp_path).is_locked()
    with caplog.at_level(logging.WARNING), RunStore(tmp_path).lock():
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "stale run lock of an unreadable lock file: unreadable" in caplog.text
