"""Streaming ImageFolder data under data parallelism: the two features together.

Ground truths: the same ``hawq run`` at ``distributed.world_size: 1`` (augmentation on, so the
crops must be a function of (seed, epoch, image) only, not of the rank that decodes them), and,
for what a rank decodes, the files themselves: every training image outside a rank's share is
deleted before that rank's epoch, so decoding any of them fails naming the file
(``data.bad_images: fail``), while the rank's batches must equal its slices of the world-size-1
global batches.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from jpeg_folder import image_config, make_imagefolder
from test_data_parallel import _close_rows, _close_weights, _weights
from tiny_run import REPO, hawq_cmd, subprocess_env

from hawq import derive_seed
from hawq.metrics import batches
from pipeline.data import load_data

pytest.importorskip("PIL")

TESTS = Path(__file__).resolve().parent
N_TRAIN, N_VAL, BATCH = 61, 20, 20  # the last global batch holds 1 image: rank 0's slice is empty


def _global_batches(data, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(x.clone(), y.clone()) for x, y in batches(data.train_data(BATCH), BATCH, gen, True,
                                                        False)]  # fmt: skip


def _share(seed: int, rank: int, world: int) -> list[list[int]]:
    """Rank ``rank``'s order positions per global batch, from the documented contract:
    order ``randperm(n)``, batch ``s`` = positions ``[sB, (s+1)B)``, rank ``r`` of a batch of
    ``b`` gets ``[floor(r b / W), floor((r+1) b / W))``."""
    order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for s in range(0, N_TRAIN, BATCH):
        b = order[s : s + BATCH]
        out.append(b[rank * len(b) // world : (rank + 1) * len(b) // world])
    return out


def test_a_rank_decodes_only_its_share_of_each_global_batch(tmp_path) -> None:
    seed, world = derive_seed(3, "qat-data", 0), 2
    whole = None
    for rank in range(world):
        # one folder per rank (the same generated images), as each would see after deletions
        root = make_imagefolder(tmp_path / f"jpegs{rank}", N_TRAIN, N_VAL)
        data = load_data(image_config(root, image_size=8, resize=10, hessian_samples=4))
        if whole is None:
            whole = _global_batches(data, seed)  # before any file is deleted
            assert [len(y) for _, y in whole] == [20, 20, 20, 1]
        share = _share(seed, rank, world)
        mine = {int(data.train_index[p]) for part in share for p in part}
        others = set(data.train_index.tolist()) - mine
        assert len(mine) == (30 if rank == 0 else 31) and len(others) == N_TRAIN - len(mine)
        for i in others:
            Path(data.train_images.name(i)).unlink()
        gen = torch.Generator().manual_seed(seed)
        got = list(batches(data.train_data(BATCH), BATCH, gen, True, False, rank=rank,
                           world_size=world))  # fmt: skip
        assert [len(y) for _, y in got] == [len(p) for p in share]
        for (x, y), (gx, gy), part in zip(got, whole, share, strict=True):
            lo = rank * len(gy) // world
            assert torch.equal(x, gx[lo : lo + len(part)]) and torch.equal(y, gy[lo : lo + len(y)])


def _config(root: Path, world: int) -> dict:
    return {
        "run": {"name": "stream-ddp", "seed": 0, "device": "cpu", "torch_threads": 1},
        "model": {"name": "ddp_model:make", "num_classes": 3, "in_channels": 3},
        "data": {"name": "imagefolder", "path": str(root), "image_size": 8, "resize": 10,
                 "streaming": True, "augment": True, "hessian_samples": 16,
                 "hessian_batch_size": 8, "batch_size": 16},
        "baseline": {"train_epochs": 1, "lr": 0.1, "batch_size": BATCH},
        "hessian": {"trace": False, "max_iter": 5, "dtype": "float64"},
        "allocation": {"sensitivity": "eigenvalue", "candidate_bits": [4, 8],
                       "compression": 4.0, "pareto_points": 0},
        "finetune": {"epochs_per_stage": 1, "blocks_per_stage": 2, "lr": 0.05,
                     "batch_size": BATCH, "checkpoint_every_steps": 2},
        "distributed": {"world_size": world},
        "backend": {"kind": "local"},
    }  # fmt: skip


@pytest.mark.slow  # two tiny pipeline runs, one on two Ray workers (~1-2 min on 2 busy cores)
def test_streamed_augmented_run_at_world_size_2_equals_world_size_1(tmp_path) -> None:
    root = make_imagefolder(tmp_path / "jpegs", N_TRAIN, N_VAL)
    env = subprocess_env(PYTHONPATH=f"{REPO}:{TESTS}")  # the workers import ddp_model
    runs = {}
    for world in (1, 2):
        cfg = tmp_path / f"w{world}.yaml"
        cfg.write_text(yaml.safe_dump(_config(root, world), sort_keys=False))
        runs[world] = tmp_path / f"w{world}"
        cmd = hawq_cmd("-q", "run", str(cfg), "--run-dir", str(runs[world]))
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    w1, w2 = runs[1], runs[2]
    for stage in ("baseline", "finetune"):
        a, b = _weights(w1, stage), _weights(w2, stage)
        assert a["1.weight"].dtype == torch.float64
        _close_weights(a, b)
    _close_rows("baseline/epochs.parquet", w1, w2, ("train_loss", "train_acc", "eval_loss"))
    _close_rows("finetune/epochs.parquet", w1, w2, ("train_loss", "train_acc", "eval_acc"))
    cols = ("eval_loss", "eval_acc", "eval_samples")
    _close_rows("evaluate/metrics.parquet", w1, w2, cols)
    final = pq.read_table(w2 / "stages/evaluate/metrics.parquet").to_pylist()[-1]
    assert final["eval_samples"] == N_VAL
    for stage in ("baseline", "finetune", "evaluate"):
        ranks = pq.read_table(w2 / "stages" / stage / "ranks.parquet").to_pylist()
        assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
