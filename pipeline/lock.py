"""The run lock: an ``O_EXCL`` lock file naming its holder; works where ``flock`` does not.

``RUN_DIR/lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+)
and holds JSON ``{host, pid, start, job_id, acquired, token}`` (``token``: random, unique to
this acquisition). A lock whose holder is gone is *stale* and taken over with a warning:

- same host, and the pid is dead (or now belongs to another process: ``start`` is the kernel's
  start time of the pid, ``/proc/<pid>/stat`` field 22, so a recycled pid is not mistaken for
  the holder);
- a Slurm job id whose job no longer runs (``squeue`` does not list it as running), or our own
  job id while the holder ran on another host or with a dead pid (an earlier incarnation of
  this requeued job).

Anything else (a live pid here, a running job, a holder on another host without a job id) is
live: acquiring fails with an error naming the holder.

Taking over uses atomic file operations only, so of many concurrent takers exactly one deletes
the stale lock, and no taker ever deletes a lock it did not judge: the takers of one stale lock
(identified by its inode, mtime and bytes) contend for a *takeover marker*
``RUN_DIR/.lock.takeover-<digest of that identity>``, created with ``O_EXCL`` and holding its
creator like a lock. Its creator alone re-reads the lock, deletes it if it is still the very
file judged stale, and removes the marker; then every taker races to create the lock afresh
(``O_EXCL``: one wins, the others find a live lock). The others wait while the marker's creator
lives. A marker whose creator died mid-way (a stale marker, judged like a lock, or older than
:data:`TAKEOVER_STALE_S`) is passed by a marker named after both, so the chain of names is the
same for every taker and each link has one creator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.atomic import StoreError

log = logging.getLogger(__name__)

UNREADABLE_GRACE_S = 5.0  # an empty lock file younger than this is being written
TAKEOVER_STALE_S = 60.0  # a takeover lasts milliseconds: a marker this old was abandoned
ACQUIRE_ATTEMPTS = 100  # create-or-judge rounds before giving up as contended
CONTENDED_SLEEP_S = 0.05  # the pause before the next round while another taker works
JobProbe = Callable[[str], bool | None]  # job id -> running? (None: cannot tell)
Identity = tuple[int, int, bytes]  # (inode, mtime in ns, content) of one lock file


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
    """What this process writes into a lock (or takeover marker) file it creates."""
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": process_start(pid),
        "job_id": current_job_id(),
        "acquired": time.time(),
        "token": uuid.uuid4().hex,
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


def parse_holder(text: bytes) -> dict[str, Any]:
    """A lock file's holder from its bytes; ``{}`` if unreadable."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def snapshot(path: Path) -> tuple[Identity, dict[str, Any]] | None:
    """The file's identity and holder (``{}``: unreadable), or None if there is no file."""
    try:
        with path.open("rb") as fh:
            stat = os.fstat(fh.fileno())
            text = fh.read()
    except FileNotFoundError:
        return None
    except OSError:  # e.g. no permission: unreadable, as old as the file says
        try:
            stat = path.stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, b""), {}
    return (stat.st_ino, stat.st_mtime_ns, text), parse_holder(text)


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock file's holder; ``{}`` for an unreadable one, None if there is no file."""
    seen = snapshot(path)
    return None if seen is None else seen[1]


def _age_s(identity: Identity) -> float:
    return time.time() - identity[1] / 1e9


def create_exclusive(path: Path, info: dict[str, Any]) -> bool:
    """Create ``path`` holding ``info`` (JSON) unless it exists: one creator wins."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def takeover_key(identity: Identity, after: str = "") -> str:
    """The marker key for taking over the file ``identity`` (``after``: the abandoned marker's
    key this one passes)."""
    return hashlib.sha256(repr((after, identity)).encode()).hexdigest()[:32]


def takeover_marker(lock: Path, key: str) -> Path:
    return lock.with_name(f".{lock.name}.takeover-{key}")


class RunLock:
    """Exclusive lock on a run dir (context manager); see the module docstring."""

    def __init__(self, path: Path, job_running: JobProbe = slurm_job_running) -> None:
        self.path = Path(path)
        self.job_running = job_running
        self._held: dict[str, Any] | None = None

    def holder(self) -> dict[str, Any] | None:
        """The live holder, or None when the lock is free or stale."""
        seen = snapshot(self.path)
        if seen is None:
            return None
        return None if self._stale_reason(*seen) else seen[1]

    def _stale_reason(self, identity: Identity, holder: dict[str, Any]) -> str | None:
        if not holder:  # unreadable: being written, or left half-written by a crash
            return "unreadable" if _age_s(identity) >= UNREADABLE_GRACE_S else None
        return stale_reason(holder, self.job_running)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(ACQUIRE_ATTEMPTS):
            info = holder_info()
            if create_exclusive(self.path, info):
                self._held = info
                return
            seen = snapshot(self.path)
            if seen is None:
                continue  # released meanwhile
            identity, holder = seen
            reason = self._stale_reason(identity, holder)
            if reason is None and not holder:
                time.sleep(0.1)  # being written right now
                continue
            if reason is None:
                raise StoreError(
                    f"{self.path.parent}: another hawq process is running in this run dir "
                    f"({describe(holder)}). Fix: wait for it to finish (see `hawq status`) or "
                    f"use another --run-dir; if it is gone, delete {self.path}."
                )
            if not self._take_over(identity, f"{describe(holder)}: {reason}"):
                time.sleep(CONTENDED_SLEEP_S)  # another taker is at it
        raise StoreError(f"{self.path}: could not take the run lock (contended). Fix: retry.")

    def _take_over(self, judged: Identity, why: str) -> bool:
        """Delete the stale lock ``judged`` if this taker wins its takeover marker (see the
        module docstring); False while another live taker holds the marker."""
        key = takeover_key(judged)
        passed: list[Path] = []
        for _ in range(ACQUIRE_ATTEMPTS):
            marker = takeover_marker(self.path, key)
            if create_exclusive(marker, holder_info()):
                break
            seen = snapshot(marker)
            if seen is None:
                continue  # its creator just finished: try to create it again
            if self._stale_reason(*seen) is None and _age_s(seen[0]) < TAKEOVER_STALE_S:
                return False
            passed.append(marker)
            key = takeover_key(seen[0], key)  # the next link of the chain
        else:
            return False
        try:
            now = snapshot(self.path)
            if now is not None and now[0] == judged:  # still the very file judged stale
                log.warning("taking over the stale run lock of %s", why)
                self.path.unlink(missing_ok=True)
        finally:
            marker.unlink(missing_ok=True)
        for stale in passed:  # the judged lock is gone for good: they guard nothing now
            stale.unlink(missing_ok=True)
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
