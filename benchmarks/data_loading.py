"""Streaming ImageFolder: decode throughput vs DataLoader workers, prepare cost vs image count.

1. images/s of a training pass (median of ``--repeats`` epochs; RandomResizedCrop + flip to
   224x224, batches of 64, uint8 until normalised in float32) over generated ImageNet-sized
   JPEGs (sides 300..500), for ``num_workers`` 0, 1, 2, from the folder and from a pack;
2. ``prepare`` (``load_data``: listing, splits, fingerprint, the Hessian set decoded) at 200 and
   2,000 images, each in fresh processes (median of ``--repeats``): wall time and peak RSS
   side by side with their ratios, streaming and (for contrast) decoded into RAM.

    python benchmarks/data_loading.py [--images 384] [--workers 0 1 2] [--repeats 3]
        [--dir /tmp/hawq-data-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PREPARE = """
import json, sys, time
t0 = time.perf_counter()
from pipeline.config.inputs import DataConfig
from pipeline.data import load_data
t1 = time.perf_counter()
cfg = DataConfig(name="imagefolder", path=sys.argv[1], image_size=224, resize=256,
                 hessian_samples=32, hessian_batch_size=32, streaming=sys.argv[2] == "stream")
load_data(cfg)
t2 = time.perf_counter()
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
rss = int(hwm.split()[1]) / 1024  # this process's peak (ru_maxrss may be the parent's)
print(json.dumps({"seconds": t2 - t1, "rss_mb": rss}))
"""


def write_jpegs(root: Path, n: int, sides: tuple[int, int], seed: int = 0) -> Path:
    """``root/{train,val}/class<k>/*.jpg``: ``n`` training and ``n // 8`` evaluation JPEGs."""
    from PIL import Image

    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(8, n // 8))):
        for i in range(count):
            folder = root / split / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
            base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
            img.save(folder / f"img{i:05d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def throughput(path: Path, workers: int, batch: int, passes: int) -> float:
    """Median images/s of ``passes`` training passes (epochs 0, 1, ...)."""
    from pipeline.config.inputs import DataConfig
    from pipeline.data import load_data

    cfg = DataConfig(
        name="imagefolder", path=str(path), image_size=224, resize=256, hessian_samples=1,
        streaming=True, augment=True, num_workers=workers,
    )  # fmt: skip
    data = load_data(cfg)
    rates = []
    for epoch in range(passes):
        t0, n = time.perf_counter(), 0
        for _, y in data.train_batches(batch, seed=0, epoch=epoch):
            n += len(y)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def prepare(path: Path, mode: str, repeats: int) -> dict:
    """Median seconds and peak RSS of ``repeats`` fresh processes running ``load_data``."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", PREPARE, str(path), mode], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in ("seconds", "rss_mb")}


def listing_ms(path: Path, repeats: int) -> float:
    """Median milliseconds to list both splits of ``path`` (what prepare does per file)."""
    from pipeline.image_lists import read_splits

    times = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        read_splits(str(path), "train", "val", "fail")
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384, help="training JPEGs for the throughput")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="passes / processes per figure (median)")
    p.add_argument("--dir", default="/tmp/hawq-data-bench")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from pipeline.pack_data import pack_data

    base = Path(args.dir)
    big = write_jpegs(base / f"jpeg{args.images}", args.images, (300, 500))
    packed = base / f"packed{args.images}"
    if not packed.exists():
        pack_data(big, packed, shard_size=128)
    kb = sum(f.stat().st_size for f in (big / "train").rglob("*.jpg")) / args.images / 1024
    print(f"cores: {os.cpu_count()}, torch threads 1; {args.images} JPEGs of 300..500 px "
          f"({kb:.0f} KB each) -> RandomResizedCrop 224 + flip, batch {args.batch}")  # fmt: skip
    print("\n| num_workers | folder images/s | pack images/s |\n| --- | --- | --- |")
    for w in args.workers:
        folder, pack = (throughput(d, w, args.batch, args.repeats) for d in (big, packed))
        print(f"| {w} | {folder:.0f} | {pack:.0f} |")
    small_dir = write_jpegs(base / "prep200", 200, (64, 128))
    large_dir = write_jpegs(base / "prep2000", 2000, (64, 128))
    print("\nprepare (load_data in a fresh process: listing, splits, fingerprint, 32 Hessian "
          "images decoded at 224 px; median of the processes)\n")  # fmt: skip
    print("| mode | 200 images: s, peak RSS MB | 2,000 images: s, peak RSS MB | ratio time, RSS |")
    print("| --- | --- | --- | --- |")
    for mode in ("stream", "ram"):
        a, b = prepare(small_dir, mode, args.repeats), prepare(large_dir, mode, args.repeats)
        name = "streaming" if mode == "stream" else "in RAM"
        ratio = f"{b['seconds'] / a['seconds']:.2f}x, {b['rss_mb'] / a['rss_mb']:.2f}x"
        print(f"| {name} | {a['seconds']:.2f}, {a['rss_mb']:.0f} "
              f"| {b['seconds']:.2f}, {b['rss_mb']:.0f} | {ratio} |")  # fmt: skip
    small_ms, large_ms = listing_ms(small_dir, args.repeats), listing_ms(large_dir, args.repeats)
    print(f"\nthe part that grows, the listing (os.scandir + stat, in this process, median): "
          f"{small_ms:.1f} ms for 200, {large_ms:.1f} ms for 2,000 images")  # fmt: skip


if __name__ == "__main__":
    main()
