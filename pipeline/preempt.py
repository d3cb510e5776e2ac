"""Deferred preemption: let a training loop save its state at a step boundary first.

A launcher whose preemption handler would stop the process at once (submitit's USR2 handler
checkpoints, requeues and exits) calls :func:`defer_or_run` from its signal handler instead. If
a training loop is inside :func:`deferrable`, the handler is stored and :func:`requested` turns
true; the loop saves its state after the current optimizer step and calls :func:`proceed`, which
runs the stored handler. Outside a training loop the handler runs at once (stages that persist
their progress as they go, like the Hessian's blocks and probes, need nothing more).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SIGNAL_ENV = "HAWQ_TEST_SIGNAL_AT"  # test hook: send this process USR2 at a matching point
_depth = 0
_pending: list[Callable[[], None]] = []


@contextlib.contextmanager
def deferrable() -> Iterator[None]:
    """Inside: a preemption waits for the loop's next :func:`proceed`."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


@contextlib.contextmanager
def safe_point() -> Iterator[None]:
    """Inside a :func:`deferrable` loop, a stretch where its state is saved (e.g. right after an
    epoch's checkpoint): a pending or new preemption runs at once."""
    global _depth
    saved, _depth = _depth, 0
    try:
        proceed()
        yield
    finally:
        _depth = saved


def defer_or_run(handler: Callable[[], None]) -> None:
    """Run ``handler`` now, or (inside :func:`deferrable`) at the loop's next step boundary."""
    if _depth == 0:
        handler()
        return
    log.warning("preemption requested: saving the training state at the next step")
    _pending.append(handler)


def requested() -> bool:
    return bool(_pending)


def proceed() -> None:
    """Run the deferred preemption handler(s) (they normally end the process)."""
    while _pending:
        _pending.pop(0)()


def signal_point(point: str) -> None:
    """Test hook: if ``$HAWQ_TEST_SIGNAL_AT`` matches ``point`` (``fnmatch``), write ``point``
    to ``$HAWQ_TEST_PAUSE_FILE`` and send this process SIGUSR2 (once), as a scheduler
    preempting it in the middle of a training step would. Points: ``<stage>:step:<epoch>:<n>``
    (after optimizer step ``n`` of global epoch ``epoch``). Unset in normal use."""
    pattern = os.environ.get(SIGNAL_ENV)
    if not pattern or not fnmatch.fnmatchcase(point, pattern):
        return
    del os.environ[SIGNAL_ENV]
    marker = os.environ.get("HAWQ_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(point)
    os.kill(os.getpid(), signal.SIGUSR2)
