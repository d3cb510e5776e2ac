"""``prepare``'s memory does not grow with the image count when streaming (200 vs 2,000 JPEGs).

Each measurement runs ``load_data`` (the data step of ``prepare``) in a fresh process and reports
its peak RSS (``VmHWM``: unlike ``ru_maxrss``, not inherited from the parent that spawned it)
and the tracemalloc peak of the call. Streaming 2,000 images must
peak within a small constant of streaming 200; the control, decoding the same 2,000 images
into RAM, must show the ~100 MB that the measurement is there to catch. No timing assertions
(``benchmarks/data_loading.py`` times it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jpeg_folder import make_imagefolder
from tiny_run import subprocess_env

pytest.importorskip("PIL")

MEASURE = """
import json, sys, tracemalloc
from pipeline.config.inputs import DataConfig
from pipeline.data import load_data
cfg = DataConfig(name="imagefolder", path=sys.argv[1], image_size=64, resize=64,
                 hessian_samples=32, hessian_batch_size=16, streaming=sys.argv[2] == "stream")
tracemalloc.start()
data = load_data(cfg)
_, peak = tracemalloc.get_traced_memory()
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"rss_kb": int(hwm.split()[1]), "traced": peak, "kind": type(data).__name__}))
"""
MB = 2**20


def measure(root: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root), mode],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # writes 2,200 JPEGs and starts three processes (~30 s on 2 busy cores)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc (VmHWM)")
def test_prepare_memory_is_flat_from_200_to_2000_images(tmp_path: Path) -> None:
    small = make_imagefolder(tmp_path / "small", 200, 40)
    large = make_imagefolder(tmp_path / "large", 2000, 40)
    s200, s2000 = measure(small, "stream"), measure(large, "stream")
    ram2000 = measure(large, "ram")
    assert (s200["kind"], s2000["kind"], ram2000["kind"]) == (
        "StreamingImages",
        "StreamingImages",
        "DataBundle",
    )
    rss_growth = (s2000["rss_kb"] - s200["rss_kb"]) * 1024
    traced_growth = s2000["traced"] - s200["traced"]
    in_ram = 2040 * 3 * 64 * 64 * 4  # the float32 tensors the in-RAM path holds: 100 MB
    assert rss_growth < 12 * MB, (s200, s2000)
    assert traced_growth < 1 * MB, (s200, s2000)
    # the control: the same measurement sees the in-RAM path's growth
    assert (ram2000["rss_kb"] - s2000["rss_kb"]) * 1024 > 0.6 * in_ram, (ram2000, s2000)
