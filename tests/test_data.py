"""Dataset loaders against their sources: shapes, pixels, labels, seeded disjoint splits."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_data import CIFAR10, needs

from pipeline.config import ConfigError, DataConfig, ModelConfig
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD, check_model_fits, load_data, read_idx

ROOT = Path(__file__).resolve().parents[1]
NPZ = CIFAR10 / "cifar10_subset.npz"
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_npz = needs("cifar10_subset.npz")


def write_idx(path: Path, array: np.ndarray, code: int, gz: bool) -> None:
    """The idx format, written independently of the reader: 0 0 type ndim, dims, big-endian."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def test_read_idx_formats_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    i4 = rng.integers(-(2**31), 2**31, (7,), dtype=np.int32)
    f8 = rng.standard_normal((2, 3))
    write_idx(tmp_path / "a.gz", u8, 0x08, gz=True)
    write_idx(tmp_path / "b", i4, 0x0C, gz=False)
    write_idx(tmp_path / "c", f8, 0x0E, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), u8)
    assert np.array_equal(read_idx(tmp_path / "b"), i4)
    assert np.array_equal(read_idx(tmp_path / "c"), f8)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ConfigError, match=r"data\.path: '.*bad' is not an idx file"):
        read_idx(tmp_path / "bad")
    raw = (tmp_path / "b").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(ConfigError, match=r"short' has 33 bytes, but its header \(7,\) implies 36"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_tiny_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "train": (rng.integers(0, 256, (30, 28, 28), np.uint8), np.arange(30, dtype=np.uint8) % 10),
        "t10k": (rng.integers(0, 256, (12, 28, 28), np.uint8), np.arange(12, dtype=np.uint8) % 10),
    }
    for prefix, (x, y) in arrays.items():
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", x, 0x08, gz=True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", y, 0x08, gz=False)
    cfg = DataConfig(
        name="fashion_mnist", path=str(tmp_path), hessian_samples=8, hessian_batch_size=4,
        normalization="none",
    )  # fmt: skip
    b = load_data(cfg)
    assert b.train_x.shape == (30, 1, 28, 28) and b.eval_x.shape == (12, 1, 28, 28)
    assert (b.in_channels, b.image_size, b.num_classes) == (1, (28, 28), 10)
    xtr, ytr = arrays["train"]
    idx = b.train_index.numpy()
    assert torch.equal(b.train_x[:, 0], torch.from_numpy(xtr[idx].astype(np.float32) / 255))
    assert torch.equal(b.train_y, torch.from_numpy(ytr[idx].astype(np.int64)))
    assert torch.equal(b.eval_y, torch.from_numpy(arrays["t10k"][1].astype(np.int64)))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte'.*apt-get install"):
        load_data(cfg)
    with pytest.raises(ConfigError, match=r"data\.path: '.*nodir' is not a directory.*apt-get"):
        load_data(DataConfig(name="fashion_mnist", path=str(tmp_path / "nodir")))


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} absent (dataset-fashion-mnist)")
def test_fashion_mnist_debian_package():
    b = load_data(DataConfig(name="fashion_mnist", hessian_samples=256))
    assert b.train_x.shape == (60000, 1, 28, 28) and b.eval_x.shape == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert torch.bincount(b.train_y).tolist() == [6000] * 10
    assert torch.bincount(b.eval_y).tolist() == [1000] * 10


def test_digits_matches_sklearn_and_splits_are_disjoint():
    from sklearn.datasets import load_digits

    d = load_digits()
    b = load_data(DataConfig(name="digits", normalization="none", hessian_samples=200))
    assert (b.in_channels, b.image_size, b.num_classes) == (1, (8, 8), 10)
    assert len(b.train_y) + len(b.eval_y) == 1797 and len(b.eval_y) == round(0.2 * 1797)
    train, evl = b.train_index.numpy(), b.eval_index.numpy()
    assert b.eval_from_train and not set(train) & set(evl)
    assert sorted(np.concatenate([train, evl])) == list(range(1797))
    assert torch.equal(b.train_x[:, 0], torch.from_numpy((d.images[train] / 16).astype(np.float32)))
    assert torch.equal(b.eval_y, torch.from_numpy(d.target[evl]))
    assert set(b.hessian_index.tolist()) <= set(train.tolist())
    assert [len(y) for _, y in b.hessian] == [128, 72]
    hx = torch.cat([x for x, _ in b.hessian])
    assert torch.equal(hx, b.train_x[:200])  # the Hessian subset is the head of the pool


def test_dataset_normalisation_uses_training_statistics():
    b = load_data(DataConfig(name="digits", hessian_samples=64))
    assert abs(b.train_x.mean().item()) < 1e-5 and abs(b.train_x.std().item() - 1) < 1e-3
    raw = load_data(DataConfig(name="digits", hessian_samples=64, normalization="none"))
    assert b.mean[0] == pytest.approx(raw.train_x.mean().item(), abs=1e-6)


@needs_npz
def test_cifar10_npz_and_python_batches_agree(tmp_path):
    d = np.load(NPZ)
    cfg = DataConfig(name="cifar10", path=str(NPZ), hessian_samples=256, eval_size=500, seed=3)
    b = load_data(cfg)
    assert b.train_x.shape == (4660, 3, 32, 32) and b.eval_x.shape == (500, 3, 32, 32)
    assert b.num_classes == 10 and not b.eval_from_train
    assert (b.mean, b.std) == (IMAGENET_MEAN, IMAGENET_STD)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = torch.round((b.eval_x * std + mean) * 255).to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(d["xte"][b.eval_index.numpy()]))
    assert torch.equal(b.eval_y, torch.from_numpy(d["yte"][b.eval_index.numpy()]).long())
    assert torch.equal(torch.bincount(b.train_y), torch.bincount(torch.from_numpy(d["ytr"]).long()))
    # The same images written as the official python batches load to the same tensors.
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    parts = np.array_split(np.arange(4660), 5)
    named = [(f"data_batch_{i + 1}", d["xtr"][p], d["ytr"][p]) for i, p in enumerate(parts)]
    for name, x, y in [*named, ("test_batch", d["xte"], d["yte"])]:
        with open(batches / name, "wb") as f:
            pickle.dump({b"data": x.reshape(len(x), -1), b"labels": [int(v) for v in y]}, f)
    again = load_data(
        DataConfig(name="cifar10", path=str(tmp_path), hessian_samples=256, eval_size=500, seed=3)
    )
    assert again.fingerprint == b.fingerprint
    assert torch.equal(again.train_x, b.train_x) and torch.equal(again.eval_y, b.eval_y)
    (batches / "data_batch_4").unlink()
    with pytest.raises(ConfigError, match=r"lacks the CIFAR-10 batches \['data_batch_4'\]"):
        load_data(DataConfig(name="cifar10", path=str(tmp_path)))


def test_imagefolder_decodes_real_pixels(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * 255 / 16).astype(np.uint8)
    for split, rows in (("train", range(0, 40)), ("val", range(40, 60))):
        for i in rows:
            folder = tmp_path / split / f"digit{d.target[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            pil.fromarray(images[i]).save(folder / f"{i:03d}.png")
    classes = sorted({f"digit{t}" for t in d.target[:40]})
    cfg = DataConfig(
        name="imagefolder", path=str(tmp_path), image_size=8, resize=8, normalization="none",
        hessian_samples=16, hessian_batch_size=8,
    )  # fmt: skip
    b = load_data(cfg)
    assert b.num_classes == len(classes) and b.train_x.shape == (40, 3, 8, 8)
    files = sorted((tmp_path / "val").glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
    for row, j in enumerate(b.eval_index.tolist()):
        i = int(files[j].stem)
        expect = torch.from_numpy(images[i].astype(np.float32) / 255)
        assert torch.equal(b.eval_x[row, 0], expect) and torch.equal(b.eval_x[row, 2], expect)
        assert classes[int(b.eval_y[row])] == f"digit{d.target[i]}"
    crop = load_data(
        DataConfig(
            name="imagefolder", path=str(tmp_path), image_size=6, resize=12, hessian_samples=16
        )
    )
    assert crop.image_size == (6, 6)
    with pytest.raises(ConfigError, match=r"data\.path: '.*nowhere/train' not found"):
        load_data(DataConfig(name="imagefolder", path=str(tmp_path / "nowhere")))


def test_synthetic_is_seeded_and_learnable_labels():
    cfg = DataConfig(name="synthetic", channels=2, image_size=4, num_classes=3, hessian_samples=64)
    a, b = load_data(cfg), load_data(cfg)
    assert torch.equal(a.train_x, b.train_x) and a.fingerprint == b.fingerprint
    assert a.train_x.shape == (2048, 2, 4, 4) and a.eval_x.shape == (512, 2, 4, 4)
    assert len(torch.unique(a.train_y)) == 3
    c = load_data(
        DataConfig(
            name="synthetic", channels=2, image_size=4, num_classes=3, hessian_samples=64, seed=1
        )
    )
    assert not torch.equal(a.train_x, c.train_x)


def test_splits_are_deterministic_per_seed_and_fingerprints_differ():
    def digits(**kw):
        return load_data(DataConfig(name="digits", hessian_samples=128, **kw))

    a, b, c = digits(seed=0), digits(seed=0), digits(seed=1)
    for key in ("train_index", "eval_index", "hessian_index"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert a.fingerprint == b.fingerprint
    assert not torch.equal(a.eval_index, c.eval_index) and a.fingerprint != c.fingerprint
    small = digits(seed=0, train_size=500)
    assert (
        torch.equal(small.train_index, a.train_index[:500]) and small.fingerprint != a.fingerprint
    )
    syn = load_data(DataConfig(name="synthetic", hessian_samples=128))
    assert len({a.fingerprint, syn.fingerprint}) == 2
    assert a.fingerprint.startswith("digits-1438-359-128-")


def test_sizes_beyond_the_data_fail_before_loading():
    with pytest.raises(ConfigError, match=r"data\.hessian_samples: 2000 exceeds the 1438"):
        load_data(DataConfig(name="digits", hessian_samples=2000))
    with pytest.raises(ConfigError, match=r"data\.train_size: 1500 exceeds the 1438"):
        load_data(DataConfig(name="digits", train_size=1500))
    with pytest.raises(ConfigError, match=r"data\.eval_size: 1797 leaves no training data"):
        load_data(DataConfig(name="digits", eval_size=1797))
    with pytest.raises(ConfigError, match=r"data\.train_size: .* GiB as float32, over half"):
        load_data(DataConfig(name="synthetic", image_size=224, channels=3, train_size=10**6))
    with pytest.raises(ConfigError, match=r"data\.path: '.*none\.npz' not found"):
        load_data(DataConfig(name="cifar10", path="none.npz"))
    with pytest.raises(ConfigError, match="'imagenet' needs 3 channels"):
        load_data(DataConfig(name="digits", normalization="imagenet", hessian_samples=64))


def test_check_model_fits():
    b = load_data(
        DataConfig(name="synthetic", channels=3, image_size=8, num_classes=4, hessian_samples=64)
    )
    check_model_fits(b, ModelConfig(name="small_cnn", in_channels=3, num_classes=4))
    with pytest.raises(ConfigError, match=r"model\.num_classes: 10 but data has 4 classes"):
        check_model_fits(b, ModelConfig(name="small_cnn", in_channels=3))
    with pytest.raises(ConfigError, match=r"model\.image_size: 16 but data images are \(8, 8\)"):
        check_model_fits(b, ModelConfig(name="mlp", in_channels=3, num_classes=4, image_size=16))
