"""``hawq pack-data``: Parquet shards of the JPEG bytes read back as the same batches.

Ground truth: the ImageFolder the pack was made from (same batches, augmentation included),
the shard files themselves (SHA-256 recomputed here, one row group per image, bytes equal to
the source files).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from jpeg_folder import corrupt_jpeg, image_config, make_imagefolder

from pipeline.cli import main
from pipeline.config.strict import ConfigError
from pipeline.data import load_data

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("jpegs"), 70, 20)


def pack(src: Path, out: Path, *args: str) -> int:
    return main(["-q", "pack-data", str(src), str(out), *args])


def test_pack_reads_back_as_the_folders_batches(folder, tmp_path, capsys):
    out = tmp_path / "packed"
    assert pack(folder, out, "--shard-size", "32") == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "train: 70 images, 3 shard(s)",
        "val: 20 images, 1 shard(s)",
    ]
    assert not list(tmp_path.glob(".packed*"))  # the temp folder was renamed into place
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["classes"] == ["class0", "class1", "class2"]
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            file = out / shard["file"]
            assert hashlib.sha256(file.read_bytes()).hexdigest() == shard["sha256"]
            meta = pq.ParquetFile(file).metadata
            assert meta.num_rows == shard["rows"] == meta.num_row_groups  # one image per group
    first = pq.ParquetFile(out / "train-00001.parquet").read_row_group(0).to_pylist()[0]
    assert first["jpeg"] == (folder / first["path"]).read_bytes()  # the file's bytes, as is
    a, b = load_data(image_config(folder)), load_data(image_config(out, num_workers=2))
    assert a.fingerprint != b.fingerprint  # a pack is fingerprinted by its manifest
    for seed, epoch in ((0, 0), (4, 3)):
        for (x1, y1), (x2, y2) in zip(
            a.train_batches(16, seed=seed, epoch=epoch),
            b.train_batches(16, seed=seed, epoch=epoch),
            strict=True,
        ):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(a.eval_batches(8), b.eval_batches(8), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(a.hessian, b.hessian, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    b = pickle.loads(pickle.dumps(b))  # e.g. sent to a data-parallel worker: shards reopen
    whole = list(a.train_batches(16, seed=4, epoch=3))
    resumed = b.train_batches(16, seed=4, epoch=3, start_step=2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(whole[2:], resumed, strict=True))


def test_pack_data_refuses_bad_arguments_and_leaves_nothing(folder, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert pack(folder, taken) == 2
    assert "OUT_DIR" in capsys.readouterr().err and sorted(tmp_path.iterdir()) == [taken]
    assert pack(tmp_path / "nowhere", tmp_path / "out") == 2
    assert "is not a directory" in capsys.readouterr().err
    assert pack(folder, tmp_path / "out", "--shard-size", "0") == 2
    assert "--shard-size 0 must be an integer >= 1" in capsys.readouterr().err
    bad = Path(shutil.copytree(folder, tmp_path / "bad"))
    (bad / "train" / "class1" / "notes.txt").write_text("not an image")
    assert pack(bad, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "notes.txt' is not an image file" in err and "--bad-images skip" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "taken"]  # no out, no temp
    assert pack(bad, tmp_path / "out", "--bad-images", "skip") == 0
    assert (
        json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["count"]
        == 70
    )


def test_damaged_packs_fail_naming_the_file(folder, tmp_path):
    src = Path(shutil.copytree(folder, tmp_path / "src"))
    victim = sorted((src / "train" / "class2").iterdir())[3]
    corrupt_jpeg(victim)
    out = tmp_path / "packed"
    assert pack(src, out, "--shard-size", "32") == 0
    with pytest.raises(ConfigError, match=rf"row \d+ \(train/class2/{victim.name}\)' could not"):
        for _ in load_data(image_config(out, hessian_samples=1)).train_batches(16, seed=0):
            pass
    shard = out / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="train-00001.parquet' is missing or not the size"):
        load_data(image_config(out))
