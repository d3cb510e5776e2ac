"""The user's own code named in a config: ``package.module:function`` import paths.

``model.name``, ``data.factory`` and ``loss`` may name a function of the user's package. It is
imported by the driver and, unpickled by reference, by every Ray actor and Slurm job, so the
package must be importable there too (installed, or its directory on ``PYTHONPATH``).
:func:`check_imports` imports each one before any work starts; an import failure is one line
that names the key, the path, the cause and the fix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.config.strict import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig

__all__ = ["IMPORT_FIX", "check_imports", "import_callable", "user_code_paths"]

IMPORT_FIX = "pip install your package or add its directory to PYTHONPATH"


def import_callable(key: str, path: str) -> Callable[..., Any]:
    """The callable ``path`` (``package.module:function``) names; ``ConfigError`` at ``key``."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure gets the same clear message
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(key, f"cannot import {path!r} ({cause}). Fix: {IMPORT_FIX}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ConfigError(
            key, f"module {module_name!r} has no callable {attr!r}. Fix: check the name after ':'"
        )
    return fn


def user_code_paths(cfg: RunConfig) -> dict[str, str]:
    """Config key -> import path of every piece of user code the config names."""
    out = {}
    name = cfg.model.name
    if ":" in name and not name.startswith("torchvision:"):
        out["model.name"] = name
    if cfg.data.factory is not None:
        out["data.factory"] = cfg.data.factory
    if cfg.loss is not None:
        out["loss"] = cfg.loss
    return out


def check_imports(cfg: RunConfig) -> None:
    """Import every user function the config names; fail with the fix before any work."""
    for key, path in user_code_paths(cfg).items():
        import_callable(key, path)
