"""Where the images of an ImageFolder split are: file lists and packed shards, never pixels.

Two layouts, one interface (:class:`FolderImages`, :class:`PackedImages`: ``labels``,
``len``, ``read(i) -> bytes``, ``name(i)``, ``content_id``):

* a folder ``root/<split>/<class>/<image>`` (classes = the training split's sub-directories,
  sorted; files sorted by name). Listing stats every file (``os.scandir``), decodes nothing;
  ``content_id`` hashes every (relative path, size, mtime). What a listing can see is checked
  here: empty files and files whose extension is not an image's are bad input (see
  ``data.bad_images``); hidden files (``.name``) are ignored.
* a pack made by ``hawq pack-data`` (:mod:`pipeline.pack_data`): ``manifest.json`` + per split
  an index (``<split>-index.parquet``: label, shard, row) and shards of (path, label, jpeg).
  ``content_id`` hashes the manifest, which holds every shard's SHA-256.

Memory is O(number of images) x a few dozen bytes (Arrow strings / numpy columns, no Python
object per image), so DataLoader workers forked from this process share it copy-on-write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config.strict import ConfigError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST",
    "PACK_FORMAT",
    "FolderImages",
    "ImageList",
    "PackedImages",
    "is_pack",
    "read_splits",
    "scan_folder",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
MANIFEST = "manifest.json"
PACK_FORMAT = "hawq.pack/1"
OPEN_SHARDS = 32  # Parquet shards kept open per process (LRU)
BadPolicy = Literal["fail", "skip"]


def bad_file(file: str, problem: str) -> ConfigError:
    """The one error of an unusable image: names the file and both fixes."""
    return ConfigError(
        "data.path",
        f"{file!r} {problem}. Fix: replace or delete the file, or set data.bad_images: skip",
    )


@dataclass(frozen=True, kw_only=True, eq=False)
class FolderImages:
    """The images of one ImageFolder split: paths relative to ``root`` and labels."""

    root: str
    paths: pa.StringArray
    labels: np.ndarray
    content_id: str

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return os.path.join(self.root, self.paths[int(i)].as_py())

    def read(self, i: int) -> bytes:
        with open(self.name(i), "rb") as f:
            return f.read()


@dataclass(frozen=True, kw_only=True, eq=False)
class PackedImages:
    """The images of one packed split: image ``i`` is row ``row[i]`` of shard ``shard[i]``
    (one image per Parquet row group, so reading it reads that image only)."""

    root: str
    shards: tuple[str, ...]
    shard: np.ndarray
    row: np.ndarray
    labels: np.ndarray
    content_id: str
    _open: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": OrderedDict()}  # file handles stay in their process

    def _file(self, k: int) -> pq.ParquetFile:
        key = (os.getpid(), k)
        pf = self._open.pop(key, None) or pq.ParquetFile(os.path.join(self.root, self.shards[k]))
        self._open[key] = pf
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return pf

    def _cell(self, i: int, column: str):
        return (
            self._file(int(self.shard[i]))
            .read_row_group(int(self.row[i]), columns=[column])[column][0]
            .as_py()
        )

    def name(self, i: int) -> str:
        shard = self.shards[int(self.shard[i])]
        try:
            path = self._cell(i, "path")
        except (OSError, pa.ArrowException):
            path = "?"
        return f"{os.path.join(self.root, shard)} row {int(self.row[i])} ({path})"

    def read(self, i: int) -> bytes:
        return self._cell(i, "jpeg")


ImageList = FolderImages | PackedImages


def _classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise ConfigError("data.path", f"{str(root)!r} not found; expected root/<split>/<class>/*")
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def scan_folder(
    root: Path, classes: list[str] | None, bad_images: BadPolicy
) -> tuple[list[str], FolderImages]:
    """List ``root/<class>/*`` (classes: ``classes``, or ``root``'s sub-directories); check
    what a listing can (empty files, non-image extensions) under ``bad_images``."""
    found = _classes(root)
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        extra = sorted(set(found) - set(classes))[:5]
        raise ConfigError("data.path", f"{str(root)!r} has classes not in the train split: {extra}")
    h = hashlib.sha256()
    chunks, labels, skipped = [], [], []
    for label, name in enumerate(classes):
        cdir = root / name
        if not cdir.is_dir():
            continue
        names = []
        for entry in sorted(os.scandir(cdir), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            st = entry.stat()
            problem = None
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                problem = f"is not an image file (extensions: {', '.join(IMAGE_EXTENSIONS)})"
            elif st.st_size == 0:
                problem = "is empty (0 bytes)"
            if problem is not None:
                if bad_images == "fail":
                    raise bad_file(entry.path, problem)
                skipped.append(entry.path)
                continue
            rel = f"{name}/{entry.name}"
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            names.append(rel)
        chunks.append(pa.array(names, pa.string()))
        labels.append(np.full(len(names), label, dtype=np.int64))
    if skipped:
        log.warning("skipped %d unusable file(s) under %s, e.g. %s", len(skipped), root, skipped[0])
    paths = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
    if len(paths) == 0:
        raise ConfigError(
            "data.path", f"{str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
        )
    ids = np.concatenate(labels)
    return classes, FolderImages(root=str(root), paths=paths, labels=ids, content_id=h.hexdigest())


def is_pack(path: str | os.PathLike) -> bool:
    """``path`` is a pack made by ``hawq pack-data`` (it holds a ``manifest.json``)."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def _read_manifest(root: Path) -> dict:
    file = root / MANIFEST
    try:
        manifest = json.loads(file.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError("data.path", f"{str(file)!r} cannot be read ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise ConfigError(
            "data.path", f"{str(file)!r} is not a {PACK_FORMAT} manifest; re-run hawq pack-data"
        )
    return manifest


def _packed_split(root: Path, manifest: dict, split: str, content_id: str) -> PackedImages:
    info = manifest["splits"].get(split)
    if info is None:
        raise ConfigError(
            "data.train_split" if split == manifest.get("train_split") else "data.path",
            f"the pack {str(root)!r} has no split {split!r} (it has {sorted(manifest['splits'])})",
        )
    for shard in info["shards"]:
        file = root / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["bytes"]:
            raise ConfigError(
                "data.path",
                f"{str(file)!r} is missing or not the size the manifest records; "
                "re-run hawq pack-data",
            )
    index_file = root / info["index"]
    try:
        index = pq.read_table(index_file, columns=["label", "shard", "row"])
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError("data.path", f"{str(index_file)!r} cannot be read ({exc})") from None
    return PackedImages(
        root=str(root),
        shards=tuple(s["file"] for s in info["shards"]),
        shard=index["shard"].to_numpy().astype(np.int32),
        row=index["row"].to_numpy().astype(np.int64),
        labels=index["label"].to_numpy().astype(np.int64),
        content_id=content_id,
    )


def read_splits(
    path: str, train_split: str, eval_split: str, bad_images: BadPolicy
) -> tuple[list[str], ImageList, ImageList]:
    """(classes, training split, evaluation split) of an ImageFolder or a pack at ``path``;
    evaluation labels index the training split's classes."""
    root = Path(path)
    if not is_pack(root):
        classes, train = scan_folder(root / train_split, None, bad_images)
        _, evals = scan_folder(root / eval_split, classes, bad_images)
        return classes, train, evals
    manifest = _read_manifest(root)
    content_id = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()
    train = _packed_split(root, manifest, train_split, content_id)
    evals = _packed_split(root, manifest, eval_split, content_id)
    classes = list(manifest["splits"][train_split]["classes"])
    eval_classes = manifest["splits"][eval_split]["classes"]
    unknown = sorted(set(eval_classes) - set(classes))
    if unknown:
        raise ConfigError(
            "data.path",
            f"{str(root)!r}: {eval_split} has classes not in {train_split}: {unknown[:5]}",
        )
    to_train = np.asarray([classes.index(c) for c in eval_classes], dtype=np.int64)
    evals = dataclasses.replace(evals, labels=to_train[evals.labels], _open=OrderedDict())
    return classes, train, evals
