"""Atomic file writes, checked reads and the test pause hook.

Every file is written to a dot-prefixed temp name in its own directory (``.NAME.PID.tmp``),
fsynced, then ``os.replace``d over the target, so a kill leaves the old file, the new file, or a
temp file (which :meth:`pipeline.store.RunStore.remove_temp_files` deletes). Reads of Parquet
and safetensors files turn truncation or corruption into a :class:`StoreError` that names the
file and the fix.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

if TYPE_CHECKING:  # torch loads only with the safetensors helpers (slurm imports this module)
    import torch

TEMP_SUFFIX = ".tmp"
RUN_DIR_MARKERS = ("manifest.parquet", "config.yaml")

PAUSE_ENV = "HAWQ_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "HAWQ_TEST_PAUSE_FILE"


def pause_point(point: str) -> None:
    """Test hook: stop at a named point so a test can SIGKILL the process there.

    If ``$HAWQ_TEST_PAUSE_AT`` matches ``point`` (``fnmatch`` pattern, e.g. ``hessian:block:1``
    or ``export:write:*``), write ``point`` to ``$HAWQ_TEST_PAUSE_FILE`` and sleep until killed.
    Points: ``<stage>:start``, ``<stage>:written`` (outputs written, manifest row not yet
    done), ``<stage>:done`` (after the manifest row), ``baseline:epoch:<n>``,
    ``hessian:block:<n>``, ``hessian:probe:<n>`` (Ray backend: ``n`` Hutchinson probes
    consumed), ``hessian:probe-saved:<n>`` (``n`` probes on disk), ``evaluate:ptq``,
    ``finetune:epoch:<n>`` (after the state is saved), ``finetune:step:<epoch>:<n>`` (a
    mid-epoch state saved after step ``n``) and
    ``<folder>:write:<file>`` (the temp file written, not yet renamed; ``<folder>`` is the
    file's parent folder, i.e. the stage name for a stage's own files). Unset in normal use.
    """
    pattern = os.environ.get(PAUSE_ENV)
    if not pattern or not fnmatch.fnmatchcase(point, pattern):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(point)
    time.sleep(600)
    os._exit(3)


class StoreError(ValueError):
    """A run directory or one of its files cannot be used; the message names the fix."""


# --------------------------------------------------------------------------- atomic writes


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a dot-prefixed temp file beside ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    pause_point(f"{path.parent.name}:write:{path.name}")
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write JSON (sorted keys, stable across runs)."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    """Atomically write a Parquet table."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def atomic_write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write a safetensors file (tensors made contiguous and CPU-resident)."""
    from safetensors.torch import save

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=dict(metadata or {})))


# --------------------------------------------------------------------------- checked reads


def corrupt_error(path: Path, what: str, err: Exception) -> StoreError:
    return StoreError(
        f"{path}: {what} is truncated or corrupt ({type(err).__name__}: {err}). "
        f"Fix: run `hawq resume {_run_dir_of(path)} --repair` (deletes it and recomputes it)."
    )


def _run_dir_of(path: Path) -> Path:
    for parent in Path(path).parents:
        if parent.name == "stages" or any((parent / m).exists() for m in RUN_DIR_MARKERS):
            return parent.parent if parent.name == "stages" else parent
    return Path(path).parent


def read_parquet(path: Path) -> pa.Table:
    """Read a Parquet table; a truncated or corrupt file raises :class:`StoreError` naming it."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as err:
        raise corrupt_error(Path(path), "Parquet file", err) from None


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file and its string metadata; corruption raises :class:`StoreError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            meta = dict(fh.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError and OSError
        raise corrupt_error(Path(path), "safetensors file", err) from None
    return tensors, meta


def _check_safetensors(path: Path) -> None:
    """Header parses and the file is exactly as long as the header says (no data read)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file size {size}")
        header = json.loads(fh.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        raise ValueError(f"{size} bytes, but the header describes {8 + n + max(ends, default=0)}")


def check_file(path: Path) -> None:
    """Cheap integrity check of one stored file (Parquet footer, safetensors header, JSON)."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            pq.read_metadata(path)
        elif path.suffix == ".safetensors":
            _check_safetensors(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
    except StoreError:
        raise
    except (pa.ArrowException, OSError, ValueError, yaml.YAMLError) as err:
        kind = {".parquet": "Parquet", ".safetensors": "safetensors", ".json": "JSON"}
        raise corrupt_error(path, f"{kind.get(path.suffix, 'YAML')} file", err) from None
