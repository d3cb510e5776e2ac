"""Streaming ImageFolder: batches as a pure function of (seed, epoch, rank), workers, resume.

Real JPEGs written with Pillow into temp dirs (tests/jpeg_folder.py). Ground truths: the same
batches decoded another way (in-RAM tensors, no workers, world size 1, from step 0), the
dataset's own files (deleted to prove they are not read), closed-form crop geometry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from jpeg_folder import image_config, make_imagefolder

from hawq.metrics import batches
from pipeline.batching import epoch_generator
from pipeline.config.inputs import DataConfig
from pipeline.config.strict import ConfigError
from pipeline.data import DataBundle, load_data
from pipeline.data_images import StreamingImages
from pipeline.image_transforms import RRC_RATIO, RRC_SCALE, random_resized_crop_box

pytest.importorskip("PIL")
B = 16  # global batch size


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("jpegs"), 90, 24)


def stream(path: Path, **kw) -> StreamingImages:
    data = load_data(image_config(path, **kw))
    assert isinstance(data, StreamingImages)
    return data


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def test_batches_are_a_pure_function_of_seed_and_epoch_whatever_the_workers(folder):
    data = stream(folder)
    first = list(data.train_batches(B, seed=3, epoch=1))
    assert [len(y) for _, y in first] == [16] * 5 + [10]
    assert first[0][0].dtype == torch.float32 and first[0][0].shape == (16, 3, 16, 16)
    assert same(first, list(data.train_batches(B, seed=3, epoch=1)))
    with_workers = stream(folder, num_workers=2)
    assert same(first, list(with_workers.train_batches(B, seed=3, epoch=1)))
    # another epoch or seed: another order and other crops of the same images
    for other in (data.train_batches(B, seed=3, epoch=2), data.train_batches(B, seed=4, epoch=1)):
        assert not same(first, list(other))
    labels = torch.cat([y for _, y in first]).sort().values
    other_labels = torch.cat([y for _, y in data.train_batches(B, seed=4)]).sort().values
    assert torch.equal(labels, other_labels)  # the same images, in another order


def test_rank_slices_concatenate_to_the_global_batch(folder):
    data = stream(folder)
    whole = list(data.train_batches(B, seed=0, epoch=0))
    for n in (2, 3):
        parts = [list(data.train_batches(B, seed=0, rank=r, world_size=n)) for r in range(n)]
        assert all(len(p) == len(whole) for p in parts)  # every rank makes the same steps
        for step, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([p[step][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[step][1] for p in parts]), y)
    eval_whole = list(data.eval_batches(10))
    eval_parts = [list(data.eval_batches(10, rank=r, world_size=2)) for r in range(2)]
    for step, (x, _) in enumerate(eval_whole):
        assert torch.equal(torch.cat([eval_parts[0][step][0], eval_parts[1][step][0]]), x)
    with pytest.raises(ValueError, match="rank < world_size"):
        data.train_batches(B, seed=0, rank=2, world_size=2)


def test_resume_at_step_k_decodes_none_of_the_skipped_images(folder, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    data = stream(copy)
    whole = list(data.train_batches(B, seed=5, epoch=2))
    k = 3
    # the images of batches 0..k-1 are deleted: reading any of them would fail naming it
    order = torch.randperm(len(data.train_index), generator=epoch_generator(5, 2))
    for pos in order[: k * B].tolist():
        Path(data.train_images.name(int(data.train_index[pos]))).unlink()
    resumed = list(data.train_batches(B, seed=5, epoch=2, start_step=k))
    assert same(whole[k:], resumed)
    for rank in range(2):  # rank slices resume the same way
        part = data.train_batches(B, seed=5, epoch=2, rank=rank, world_size=2, start_step=k)
        for (x, _), (w, _) in zip(part, whole[k:], strict=True):
            lo, hi = rank * len(w) // 2, (rank + 1) * len(w) // 2
            assert torch.equal(x, w[lo:hi])


def test_the_training_loop_form_resumes_through_from_step(folder):
    data = stream(folder)
    loop_data = data.train_data(B)
    gen = torch.Generator().manual_seed(11)
    whole = list(batches(loop_data, B, gen, True, False))
    again = list(batches(loop_data, B, torch.Generator().manual_seed(11), True, False, start=2))
    assert same(whole[2:], again)
    eval_loop = list(batches(data.eval_data(7), 7, torch.Generator(), False, False))
    assert same(eval_loop, list(data.eval_batches(7)))


def test_without_augmentation_streaming_equals_the_in_ram_tensors(folder):
    streamed = stream(folder, augment=False)
    ram = load_data(image_config(folder, augment=False, streaming=False))
    assert isinstance(ram, DataBundle)
    assert ram.fingerprint == streamed.fingerprint  # the file list, not the pixels
    assert torch.equal(torch.cat([x for x, _ in streamed.eval_batches(10)]), ram.eval_x)
    for (a, ya), (b, yb) in zip(streamed.hessian, ram.hessian, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    for seed in (0, 1):  # the hawq loop: tensors cut by the loop vs the streaming callable
        cut = batches(ram.train_data(B), B, torch.Generator().manual_seed(seed), True, False)
        got = batches(streamed.train_data(B), B, torch.Generator().manual_seed(seed), True, False)
        assert same(list(cut), list(got))
        ram_batches = list(ram.train_batches(B, seed=seed))
        assert same(ram_batches, list(streamed.train_batches(B, seed=seed)))
    assert torch.equal(streamed.example(3), ram.example(3))


def test_in_ram_bundle_slices_ranks_the_same_way(folder):
    ram = load_data(image_config(folder, augment=False, streaming=False))
    whole = list(ram.train_batches(B, seed=2, epoch=1))
    parts = [list(ram.train_batches(B, seed=2, epoch=1, rank=r, world_size=2)) for r in range(2)]
    for step, (x, _) in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][step][0], parts[1][step][0]]), x)
    assert same(whole[2:], list(ram.train_batches(B, seed=2, epoch=1, start_step=2)))
    loop = ram.train_data(B, rank=1, world_size=2)  # world size > 1: the callable form
    got = list(batches(loop, B, torch.Generator().manual_seed(9), True, False))
    cut = list(batches(ram.train_data(B), B, torch.Generator().manual_seed(9), True, False))
    assert all(torch.equal(g[0], c[0][len(c[0]) // 2 :]) for g, c in zip(got, cut, strict=True))


def test_fingerprint_follows_the_file_list_not_the_pixels(folder, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))  # copytree keeps mtimes
    base = stream(copy).fingerprint
    assert stream(copy).fingerprint == base
    victim = next((copy / "train" / "class0").iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")  # one byte longer
    assert stream(copy).fingerprint != base
    victim.unlink()
    assert stream(copy).fingerprint != base
    assert stream(copy, seed=1).fingerprint != stream(copy).fingerprint


def test_auto_streams_with_augmentation_or_above_the_ram_bound(folder):
    assert isinstance(load_data(image_config(folder, streaming="auto", augment=False)), DataBundle)
    assert isinstance(
        load_data(image_config(folder, streaming="auto", augment=True)), StreamingImages
    )
    big = image_config(folder, streaming="auto", image_size=1024, resize=1024, hessian_samples=1)
    assert isinstance(load_data(big), StreamingImages)  # 114 x 3 x 1024^2 float32 > 1 GiB
    with pytest.raises(ConfigError, match="augment: needs streaming"):
        image_config(folder, streaming=False)
    with pytest.raises(ConfigError, match="data.normalization: 'dataset' needs every training"):
        load_data(image_config(folder, normalization="dataset", streaming="auto"))
    with pytest.raises(ConfigError, match="bad_images: only applies to data.name: imagefolder"):
        DataConfig(name="digits", bad_images="skip")


def test_random_resized_crop_box_stays_inside_the_scale_and_ratio_bounds():
    rng = np.random.default_rng(0)
    for w, h in ((64, 48), (17, 91), (300, 300)):
        for _ in range(200):
            left, top, cw, ch = random_resized_crop_box(w, h, rng)
            assert left >= 0 and left + cw <= w and top >= 0 and top + ch <= h
            if (cw, ch) != (w, h):  # drawn, not the fallback: area and aspect within bounds
                area = cw * ch / (w * h)
                assert RRC_SCALE[0] * 0.8 <= area <= RRC_SCALE[1] * 1.05
                assert RRC_RATIO[0] * 0.8 <= cw / ch <= RRC_RATIO[1] * 1.25
    # a 1000 x 10 strip cannot hold a crop of aspect <= 4/3 and area >= 8%: the fallback is
    # the central crop with the aspect clamped to 4/3
    assert random_resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)


def test_augmentation_crops_and_flips_differ_from_evaluation(folder):
    data = stream(folder)
    flat = stream(folder, augment=False)
    x, _ = next(iter(data.train_batches(B, seed=0)))
    x_eval, _ = next(iter(flat.train_batches(B, seed=0)))
    assert x.shape == x_eval.shape and not torch.equal(x, x_eval)

    def slope(img: torch.Tensor) -> float:  # right half minus left half
        return float(img[:, :, 8:].mean() - img[:, :, :8].mean())

    flips = sum(slope(a) * slope(b) < 0 for a, b in zip(x, x_eval, strict=True))
    assert 0 < flips < B  # the gradient runs the other way in some (not all) flipped crops
