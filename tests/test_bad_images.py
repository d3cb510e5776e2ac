"""Unusable images in an ImageFolder: fail naming the file (default) or skip and log a count.

Listing problems (empty files, non-image extensions) are found at prepare time; a corrupt JPEG
when it is decoded (prepare for the Hessian set and the in-RAM path, else in its batch).
Ground truth for ``skip``: the intact folder's batches with that one image taken out.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from jpeg_folder import corrupt_jpeg, image_config, make_imagefolder

from pipeline.batching import epoch_generator
from pipeline.config.strict import ConfigError
from pipeline.data import DataBundle, load_data

pytest.importorskip("PIL")
B = 16


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("jpegs"), 64, 16)


def damaged(intact: Path, tmp_path: Path) -> tuple[Path, Path, int]:
    """A copy with one training JPEG corrupted outside the Hessian set: (root, file, index)."""
    root = Path(shutil.copytree(intact, tmp_path / "damaged"))
    data = load_data(image_config(root))
    hessian = set(data.hessian_index.tolist())
    index = next(int(i) for i in data.train_index.tolist() if int(i) not in hessian)
    file = Path(data.train_images.name(index))
    corrupt_jpeg(file)
    return root, file, index


def test_a_corrupt_jpeg_fails_naming_the_file(intact, tmp_path):
    root, file, _ = damaged(intact, tmp_path)
    data = load_data(image_config(root))  # streaming: found when its batch is decoded
    with pytest.raises(ConfigError) as err:
        for _ in data.train_batches(B, seed=0):
            pass
    message = str(err.value)
    assert message.startswith(f"data.path: '{file}' could not be read or decoded (")
    assert "set data.bad_images: skip" in message and "\n" not in message
    with pytest.raises(ConfigError, match=f"'{file}' could not be read or decoded"):
        load_data(image_config(root, streaming=False, augment=False))  # in RAM: at prepare
    with pytest.raises(ConfigError, match=f"'{file}' could not be read or decoded"):
        load_data(image_config(root, hessian_samples=64))  # in the Hessian set: at prepare


def test_skip_drops_the_corrupt_jpeg_from_its_batch_and_logs_it(intact, tmp_path, caplog):
    root, file, index = damaged(intact, tmp_path)
    good, data = (
        load_data(image_config(intact)),
        load_data(image_config(root, bad_images="skip", num_workers=2)),
    )
    order = torch.randperm(len(good.train_index), generator=epoch_generator(7, 1))
    pos = int((good.train_index[order] == index).nonzero())
    step, row = divmod(pos, B)
    with caplog.at_level(logging.WARNING):
        got = list(data.train_batches(B, seed=7, epoch=1))
    want = list(good.train_batches(B, seed=7, epoch=1))
    assert len(got) == len(want)
    for s, ((x, y), (wx, wy)) in enumerate(zip(got, want, strict=True)):
        if s == step:  # the intact batch without that image
            keep = torch.arange(len(wy)) != row
            wx, wy = wx[keep], wy[keep]
        assert torch.equal(x, wx) and torch.equal(y, wy)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(file) in w and "could not be read or decoded" in w for w in warnings)
    assert "train: skipped 1 unreadable image(s) in this pass" in warnings
    ram = load_data(image_config(root, bad_images="skip", streaming=False, augment=False))
    assert isinstance(ram, DataBundle) and len(ram.train_y) == 63
    assert index not in ram.train_index.tolist()


def test_empty_and_non_image_files_are_found_when_listing(intact, tmp_path, caplog):
    root = Path(shutil.copytree(intact, tmp_path / "listed"))
    (root / "train" / "class0" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty.jpg' is empty \(0 bytes\). Fix: replace"):
        load_data(image_config(root, hessian_samples=1))
    (root / "train" / "class0" / "empty.jpg").unlink()
    (root / "val" / "class1" / "labels.csv").write_text("a,b\n")
    (root / "val" / "class1" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    with pytest.raises(ConfigError, match=r"labels.csv' is not an image file \(extensions: "):
        load_data(image_config(root, hessian_samples=1))
    with caplog.at_level(logging.WARNING):
        data = load_data(image_config(root, hessian_samples=1, bad_images="skip"))
    assert data.n_eval == 16
    assert any("skipped 1 unusable file(s)" in r.getMessage() for r in caplog.records)
