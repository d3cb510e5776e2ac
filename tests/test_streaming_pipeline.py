"""Streaming ImageFolder through the hawq training loop and the whole ``hawq run`` pipeline.

Ground truths: an uninterrupted training run (for a run resumed mid-epoch, whose skipped
images are deleted to prove they are not decoded again), and the in-RAM path (a streamed run
without augmentation trains and evaluates on the same tensors, so its weights and metrics
equal the in-RAM run's bit for bit).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from jpeg_folder import make_imagefolder
from safetensors.torch import load_file

from hawq import derive_seed
from hawq.qat import QATConfig, train_float
from pipeline.cli import main
from pipeline.config.inputs import DataConfig
from pipeline.data import load_data
from pipeline.models import SmallCNN

pytest.importorskip("PIL")


def test_training_resumed_mid_epoch_equals_the_uninterrupted_run(tmp_path):
    root = make_imagefolder(tmp_path / "jpegs", 80, 16)
    data = load_data(
        DataConfig(
            name="imagefolder",
            path=str(root),
            image_size=16,
            resize=18,
            hessian_samples=4,
            streaming=True,
            augment=True,
            num_workers=1,
        )  # fmt: skip
    )
    cfg = QATConfig(epochs=1, lr=0.05, batch_size=16, seed=3, schedule="constant")

    def model() -> SmallCNN:
        torch.manual_seed(0)
        return SmallCNN(3, 3)

    saved = {}

    def on_step(epoch: int, steps: int, capture) -> None:
        if steps == 2:
            saved["state"] = capture()

    whole = model()
    train_float(whole, data.train_data(16), data.eval_data(8), cfg, on_step=on_step)
    order = torch.randperm(
        80, generator=torch.Generator().manual_seed(derive_seed(3, "qat-data", 0))
    )
    for pos in order[:32].tolist():  # the two batches trained before the state was saved
        Path(data.train_images.name(int(data.train_index[pos]))).unlink()
    resumed = model()
    train_float(resumed, data.train_data(16), data.eval_data(8), cfg, state=saved["state"])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def config(root: Path, **data) -> dict:
    return {
        "run": {"name": "stream", "seed": 0, "device": "cpu", "torch_threads": 1},
        "model": {"name": "small_cnn", "num_classes": 3, "in_channels": 3},
        "data": {"name": "imagefolder", "path": str(root), "image_size": 16, "resize": 18,
                 "hessian_samples": 16, "hessian_batch_size": 8, "batch_size": 16, **data},
        "baseline": {"train_epochs": 1, "lr": 0.05, "batch_size": 16},
        "hessian": {"max_iter": 4, "trace_min_probes": 2, "trace_max_probes": 2},
        "allocation": {"method": "ilp", "candidate_bits": [4, 8], "compression": 5.0},
        "finetune": {"epochs_per_stage": 1, "blocks_per_stage": 2, "lr": 0.01, "batch_size": 16,
                     "checkpoint_every_steps": 2},
        "backend": {"kind": "local"},
    }  # fmt: skip


def run(tmp: Path, name: str, cfg: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["-q", "run", str(path), "--run-dir", str(tmp / name)]) == 0
    return tmp / name


@pytest.mark.slow  # three tiny pipeline runs (~1 min on 2 busy cores)
def test_hawq_run_streams_an_imagefolder_and_matches_the_in_ram_run(tmp_path):
    root = make_imagefolder(tmp_path / "jpegs", 96, 24)
    ram = run(tmp_path, "ram", config(root, streaming=False))
    streamed = run(tmp_path, "streamed", config(root, streaming=True, num_workers=2))
    for stage, file in (("baseline", "model.safetensors"), ("finetune", "model.safetensors")):
        a = load_file(ram / "stages" / stage / file)
        b = load_file(streamed / "stages" / stage / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    rows = [
        pq.read_table(r / "stages/evaluate/metrics.parquet").drop_columns(["stage_key"]).to_pylist()
        for r in (ram, streamed)
    ]
    assert repr(rows[0]) == repr(rows[1])  # repr: NaN sizes of the finetune rows compare equal
    assert rows[0][-1]["eval_samples"] == 24
    packed = tmp_path / "packed"
    assert main(["-q", "pack-data", str(root), str(packed), "--shard-size", "40"]) == 0
    aug = run(tmp_path, "augmented", config(packed, augment=True, num_workers=1))
    final = pq.read_table(aug / "stages/evaluate/metrics.parquet").to_pylist()[-1]
    assert final["phase"] == "final" and 0.0 <= final["eval_acc"] <= 1.0
    assert not torch.equal(
        load_file(aug / "stages/baseline/model.safetensors")["fc2.weight"],
        load_file(streamed / "stages/baseline/model.safetensors")["fc2.weight"],
    )  # augmented crops train another model
    shutil.rmtree(packed)
