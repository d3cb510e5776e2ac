"""``hawq pack-data SRC_DIR OUT_DIR``: an ImageFolder as Parquet shards of encoded images.

For clusters where millions of small files are slow to list and open: each split
(``SRC_DIR/<split>/<class>/<image>``, every sub-directory of ``SRC_DIR``) becomes shards
``<split>-NNNNN.parquet`` of ``--shard-size`` images with columns ``path`` (relative to
``SRC_DIR``), ``label`` (index into the split's sorted class list) and ``jpeg`` (the file's
bytes, as they are: nothing is decoded or re-encoded), one image per row group so that a
reader fetches one image with one read; ``<split>-index.parquet`` (path, label, shard, row) and
``manifest.json`` (format, classes, counts, every shard's size and SHA-256). Files are listed
and checked as ``data.name: imagefolder`` does (empty and non-image files fail, or are left out
with ``--bad-images skip``).

Atomic: everything is written into a hidden sibling folder, fsynced, then renamed to
``OUT_DIR`` (which must not exist, or be empty), so ``OUT_DIR`` is complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config.strict import ConfigError
from pipeline.image_lists import MANIFEST, PACK_FORMAT, BadPolicy, FolderImages, scan_folder

__all__ = ["DEFAULT_SHARD_SIZE", "SHARD_SCHEMA", "PackError", "pack_data"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1024  # images per shard (ImageNet: ~110 MB, ~1,250 training shards)
SHARD_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.int32()), ("jpeg", pa.binary())])
INDEX_SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.int32()), ("shard", pa.int32()), ("row", pa.int64())]
)


class PackError(ValueError):
    """Bad ``pack-data`` input: names the argument or file and the fix."""


def _fsynced(path: Path) -> str:
    """fsync ``path``; return its SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return h.hexdigest()


def _write_shard(path: Path, images: FolderImages, split: str, rows: range) -> dict:
    with pq.ParquetWriter(
        path, SHARD_SCHEMA, compression="none", use_dictionary=False, write_statistics=False
    ) as writer:
        for i in rows:  # one image per row group: a reader fetches exactly one image
            rel = f"{split}/{images.paths[i].as_py()}"
            one = [[rel], [int(images.labels[i])], [images.read(i)]]
            writer.write_table(pa.table(one, schema=SHARD_SCHEMA))
    return {"file": path.name, "rows": len(rows), "bytes": path.stat().st_size,
            "sha256": _fsynced(path)}  # fmt: skip


def _pack_split(tmp: Path, src: Path, split: str, shard_size: int, bad: BadPolicy) -> dict:
    classes, images = scan_folder(src / split, None, bad)
    n = len(images)
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        rows = range(start, min(n, start + shard_size))
        shards.append(_write_shard(tmp / f"{split}-{k:05d}.parquet", images, split, rows))
        log.info("pack-data: %s shard %d (%d/%d images)", split, k, rows.stop, n)
    shard_of = np.arange(n) // shard_size
    index = pa.table(
        [
            pa.array([f"{split}/{p}" for p in images.paths.to_pylist()], pa.string()),
            pa.array(images.labels.astype(np.int32)),
            pa.array(shard_of.astype(np.int32)),
            pa.array(np.arange(n) - shard_of * shard_size),
        ],
        schema=INDEX_SCHEMA,
    )
    index_file = tmp / f"{split}-index.parquet"
    pq.write_table(index, index_file)
    _fsynced(index_file)
    return {"classes": classes, "count": n, "index": index_file.name, "shards": shards}


def _splits(src: Path) -> list[str]:
    if not src.is_dir():
        raise PackError(f"SRC_DIR {str(src)!r} is not a directory. Fix: pass an ImageFolder root")
    splits = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    if not splits:
        raise PackError(
            f"SRC_DIR {str(src)!r} has no split folders. Fix: pass the root of "
            "<split>/<class>/<image> (e.g. train/ and val/)"
        )
    return splits


def pack_data(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    bad_images: BadPolicy = "fail",
) -> dict:
    """Pack every split of the ImageFolder ``src_dir`` into ``out_dir``; returns the manifest."""
    src, out = Path(src_dir), Path(out_dir)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise PackError(f"--shard-size {shard_size!r} must be an integer >= 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"OUT_DIR {str(out)!r} exists and is not empty. Fix: pass a new folder")
    splits = _splits(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = {
            "format": PACK_FORMAT,
            "shard_size": shard_size,
            "splits": {s: _pack_split(tmp, src, s, shard_size, bad_images) for s in splits},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _fsynced(tmp / MANIFEST)
        os.replace(tmp, out)  # onto a missing or empty folder: complete or absent
    except ConfigError as exc:
        message = exc.message.replace("data.bad_images: skip", "pass --bad-images skip")
        raise PackError(f"SRC_DIR: {message}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    total = sum(s["count"] for s in manifest["splits"].values())
    log.info("pack-data: %d images in %d split(s) -> %s", total, len(splits), out)
    return manifest
