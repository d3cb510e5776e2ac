"""The run's log file: ``RUN_DIR/hawq.log``, appended by every ``hawq run`` / ``resume``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOG_FILE", "log_to_file"]

LOG_FILE = "hawq.log"  # the run's log, appended by every run / resume of the run dir


class _AsBefore(logging.Filter):
    """Drops the records that the logging set-up before ``log_to_file`` would have dropped."""

    def __init__(self, root_level: int) -> None:
        super().__init__()
        self.root_level = root_level

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root and not logger.level:
            logger = logger.parent
        level = logger.level if logger is not None and logger is not logging.root else 0
        return record.levelno >= (level or self.root_level)


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Append the log at INFO and above to ``path`` meanwhile; other handlers see no change.

    When the root logger is above INFO (e.g. ``-q``), it is lowered to INFO for the file and the
    other root handlers get a filter that drops what they would not have seen before.
    """
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    root = logging.getLogger()
    old_level, others = root.level, list(root.handlers)
    as_before = _AsBefore(old_level)
    if old_level > logging.INFO:
        for h in others:
            h.addFilter(as_before)
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        for h in others:
            h.removeFilter(as_before)
