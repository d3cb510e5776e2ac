"""Where the tests find the shared data: ``$HAWQ_SHARED_DATA``, else ``../shared/data``.

The default is relative to the repository (the CI clone has ``../shared`` beside it), so the
tests do not depend on the working directory. Only tests that read the data skip without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HAWQ_SHARED_DATA") or REPO.parent / "shared" / "data")
CIFAR10 = SHARED_DATA / "cifar10"


def needs(*names: str) -> pytest.MarkDecorator:
    """Skip marker for a test that reads these files under ``CIFAR10``."""
    missing = [n for n in names if not (CIFAR10 / n).is_file()]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"needs {', '.join(missing)} in {CIFAR10} (set HAWQ_SHARED_DATA; see "
        "shared/data/README.md)",
    )
