"""Readers of the raw datasets: each returns a :class:`Source` of images in [0, 1] and labels.

Formats: scikit-learn's digits, Fashion-MNIST idx(.gz) files (parsed here with numpy),
CIFAR-10 python batches or an npz with ``xtr/ytr/xte/yte`` and a seeded synthetic teacher task.
ImageFolder trees are listed and decoded by :mod:`pipeline.data_images`.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hawq.optional import require
from pipeline.config.inputs import DataConfig
from pipeline.config.strict import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FIX = "run 'apt-get install -y dataset-fashion-mnist' or set data.path to the idx files"
# idx type code -> numpy dtype (big-endian), from the MNIST file format description.
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True, kw_only=True)
class Source:
    """A dataset before splitting: labels of both splits and a fetcher of images by index.

    ``fetch(split, indices)`` returns float32 ``(n, C, H, W)`` in [0, 1] (synthetic: N(0, 1)).
    ``test_y`` is None when the dataset has no official test split (a holdout is drawn).
    """

    train_y: np.ndarray
    test_y: np.ndarray | None
    fetch: Callable[[str, np.ndarray], np.ndarray]
    num_classes: int
    shape: tuple[int, int, int]  # (C, H, W)
    location: str


class _ArrayFetch:
    """Index into in-memory uint8 (scaled by 1/255) or float arrays; picklable."""

    def __init__(self, train: np.ndarray, test: np.ndarray | None) -> None:
        self.arrays = {"train": train, "test": test}

    def __call__(self, split: str, index: np.ndarray) -> np.ndarray:
        x = self.arrays[split][index]
        if x.dtype == np.uint8:
            return x.astype(np.float32) / np.float32(255.0)
        return np.ascontiguousarray(x, dtype=np.float32)


def _array_source(xtr, ytr, xte, yte, num_classes: int, location: str) -> Source:
    for name, y in (("train", ytr), ("test", yte)):
        if y is not None and len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ConfigError(
                "data.path", f"{location}: {name} labels outside 0..{num_classes - 1}"
            )
    return Source(
        train_y=np.asarray(ytr, dtype=np.int64),
        test_y=None if yte is None else np.asarray(yte, dtype=np.int64),
        fetch=_ArrayFetch(xtr, xte),
        num_classes=num_classes,
        shape=tuple(xtr.shape[1:]),
        location=location,
    )


def read_digits() -> Source:
    """scikit-learn's 1,797 8x8 digits (pixel values 0..16 scaled to [0, 1]); no test split."""
    datasets = require("sklearn.datasets", feature="data.name: digits")
    d = datasets.load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None]
    return _array_source(x, d.target, None, None, 10, "sklearn.datasets.load_digits")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an idx file (optionally gzipped): magic ``0 0 type ndim``, big-endian uint32 dims."""
    file = os.fspath(path)
    opener = gzip.open if file.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError("data.path", f"{file!r} could not be read: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ConfigError("data.path", f"{file!r} is not an idx file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError("data.path", f"{file!r} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ConfigError(
            "data.path", f"{file!r} has {len(raw)} bytes, but its header {dims} implies {expected}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def _find(root: Path, stem: str, fix: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise ConfigError("data.path", f"{str(root / stem)!r}[.gz] not found; {fix}")


def read_fashion_mnist(path: str | None) -> Source:
    """Fashion-MNIST idx files: 60,000 train / 10,000 test 28x28 grayscale images."""
    root = Path(path or FASHION_MNIST_DIR)
    if not root.is_dir():
        raise ConfigError("data.path", f"{str(root)!r} is not a directory; {FASHION_FIX}")
    arrays = []
    for prefix in ("train", "t10k"):
        x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte", FASHION_FIX))
        y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte", FASHION_FIX))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(
                "data.path",
                f"{str(root)!r}: {prefix} images {x.shape} do not match labels {y.shape}",
            )
        arrays += [x[:, None], y]
    return _array_source(*arrays, 10, str(root))


def read_cifar10(path: str) -> Source:
    """CIFAR-10 from an npz (``xtr, ytr, xte, yte``; uint8 NCHW) or the python batches directory.

    The python batches are pickles (the official format): only read files you trust.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        with np.load(p) as d:
            keys = {"xtr", "ytr", "xte", "yte"}
            if not keys <= set(d.files):
                raise ConfigError(
                    "data.path", f"{path!r} needs arrays {sorted(keys)}, has {sorted(d.files)}"
                )
            xtr, ytr, xte, yte = (d[k] for k in ("xtr", "ytr", "xte", "yte"))
        if xtr.ndim != 4 or xtr.shape[1:] != (3, 32, 32) or xte.shape[1:] != (3, 32, 32):
            raise ConfigError(
                "data.path", f"{path!r}: images must be (N, 3, 32, 32), got {xtr.shape}"
            )
        return _array_source(xtr, ytr, xte, yte, 10, path)
    if p.is_dir():
        if (p / "cifar-10-batches-py").is_dir():
            p = p / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise ConfigError("data.path", f"{str(p)!r} lacks the CIFAR-10 batches {missing}")
        parts = [_read_cifar_batch(p / n) for n in names]
        xtr = np.concatenate([x for x, _ in parts[:5]])
        ytr = np.concatenate([y for _, y in parts[:5]])
        return _array_source(xtr, ytr, *parts[5], 10, str(p))
    raise ConfigError(
        "data.path",
        f"{path!r} is neither an .npz file nor a directory of CIFAR-10 python batches",
    )


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as f:
            d = pickle.load(f, encoding="bytes")  # noqa: S301 - the official CIFAR format
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as exc:  # noqa: BLE001 - any corrupt batch gets one clear message
        raise ConfigError(
            "data.path", f"{str(file)!r} is not a CIFAR-10 batch ({type(exc).__name__}: {exc})"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ConfigError("data.path", f"{str(file)!r}: data {data.shape}, labels {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def check_memory(n_images: int, shape: tuple[int, ...]) -> None:
    """Refuse to hold more float32 images than half of this machine's RAM."""
    need = n_images * int(np.prod(shape)) * 4
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram // 2:
        raise ConfigError(
            "data.train_size",
            f"{n_images} images of shape {tuple(shape)} need {need / 2**30:.1f} GiB as float32, "
            f"over half of this machine's {ram / 2**30:.1f} GiB; set data.train_size and "
            "data.eval_size",
        )


def read_synthetic(cfg: DataConfig) -> Source:
    """Seeded N(0, 1) inputs labelled by a fixed random two-layer teacher (argmax of logits)."""
    c, side, k = cfg.shape() or (1, 8, 10)
    n_train = max(cfg.train_size or 2048, cfg.hessian_samples)
    n_test = cfg.eval_size or 512
    check_memory(n_train + n_test, (c, side, side))
    rng = np.random.default_rng([cfg.seed, 7])
    d = c * side * side
    w1 = rng.standard_normal((d, 64)) / np.sqrt(d)
    w2 = rng.standard_normal((64, k))
    xs = [rng.standard_normal((n, c, side, side)).astype(np.float32) for n in (n_train, n_test)]
    ys = [np.argmax(np.tanh(x.reshape(len(x), -1) @ w1) @ w2, axis=1) for x in xs]
    return _array_source(xs[0], ys[0], xs[1], ys[1], k, f"synthetic(seed={cfg.seed})")
