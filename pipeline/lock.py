"""The run lock: an ``O_EXCL`` lock file naming its holder; works where ``flock`` does not.

``RUN_DIR/lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+)
and holds JSON ``{host, pid, start, job_id, acquired}``. A lock whose holder is gone is *stale*
and taken over with a warning:

- same host, and the pid is dead (or now belongs to another process: ``start`` is the kernel's
  start time of the pid, ``/proc/<pid>/stat`` field 22, so a recycled pid is not mistaken for
  the holder);
- a Slurm job id whose job no longer runs (``squeue`` does not list it as running), or our own
  job id while the holder ran on another host or with a dead pid (an earlier incarnation of
  this requeued job).

Anything else (a live pid here, a running job, a holder on another host without a job id) is
live: acquiring fails with an error naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.atomic import StoreError

log = logging.getLogger(__name__)

UNREADABLE_GRACE_S = 5.0  # an empty lock file younger than this is being written
JobProbe = Callable[[str], bool | None]  # job id -> running? (None: cannot tell)


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19]  # field 22 of stat; fields[0] is field 3


def pid_alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` runs on this host and (if known) started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = process_start(pid)
    return start is None or now is None or now == start


def squeue_states(job_id: str) -> set[str] | None:
    """The states ``squeue`` lists for ``job_id`` (empty: not queued; None: cannot tell)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return set() if "Invalid job id" in out.stderr else None
    return set(out.stdout.split())


def slurm_job_running(job_id: str) -> bool | None:
    """Whether Slurm lists ``job_id`` as running; None when ``squeue`` cannot tell."""
    states = squeue_states(job_id)
    if states is None:
        return None
    return bool(states & {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED"})


def current_job_id() -> str | None:
    """This process's Slurm job id (array jobs: ``<array id>_<task>``), if any."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def holder_info() -> dict[str, Any]:
    """What this process writes into a lock file it takes."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": process_start(pid),
        "job_id": current_job_id(),
        "acquired": time.time(),
    }


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "an unreadable lock file"
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}"


def stale_reason(holder: dict[str, Any], job_running: JobProbe = slurm_job_running) -> str | None:
    """Why the lock ``holder`` is stale, or None if it may be alive."""
    here = holder.get("host") == socket.gethostname()
    pid = holder.get("pid")
    dead_here = here and isinstance(pid, int) and not pid_alive(pid, holder.get("start"))
    if dead_here:
        return "its process is gone"
    job = holder.get("job_id")
    if job:
        if job == current_job_id() and not here:
            return "an earlier incarnation of this (requeued) job"
        if job != current_job_id() and job_running(str(job)) is False:
            return f"Slurm job {job} is no longer running"
    return None


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock file's holder; ``{}`` for an unreadable one, None if there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


class RunLock:
    """Exclusive lock on a run dir (context manager); see the module docstring."""

    def __init__(self, path: Path, job_running: JobProbe = slurm_job_running) -> None:
        self.path = Path(path)
        self.job_running = job_running
        self._held: dict[str, Any] | None = None

    def holder(self) -> dict[str, Any] | None:
        """The live holder, or None when the lock is free or stale."""
        holder = read_holder(self.path)
        if holder is None:
            return None
        if not holder:  # unreadable: being written, or left half-written by a crash
            return holder if _age_s(self.path) < UNREADABLE_GRACE_S else None
        return None if stale_reason(holder, self.job_running) else holder

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            if self._try_create():
                return
            holder = read_holder(self.path)
            if holder is None:
                continue  # released meanwhile
            if not holder and _age_s(self.path) < UNREADABLE_GRACE_S:
                time.sleep(0.1)  # being written right now
                continue
            reason = stale_reason(holder, self.job_running) if holder else "unreadable"
            if reason is None:
                raise StoreError(
                    f"{self.path.parent}: another hawq process is running in this run dir "
                    f"({describe(holder)}). Fix: wait for it to finish (see `hawq status`) or "
                    f"use another --run-dir; if it is gone, delete {self.path}."
                )
            log.warning("taking over the stale run lock of %s: %s", describe(holder), reason)
            self._remove_stale(holder)
        raise StoreError(f"{self.path}: could not take the run lock (contended). Fix: retry.")

    def _remove_stale(self, judged: dict[str, Any]) -> None:
        """Move the stale lock aside; if another taker replaced it meanwhile, put that back."""
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if read_holder(aside) != judged:  # a live lock created after we judged: restore it
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _try_create(self) -> bool:
        info = holder_info()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        self._held = info
        return True

    def release(self) -> None:
        """Delete the lock file if it is still ours."""
        if self._held is None:
            return
        if read_holder(self.path) == self._held:
            self.path.unlink(missing_ok=True)
        self._held = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
