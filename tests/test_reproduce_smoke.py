"""Smoke test of benchmarks/reproduce_cifar10.py: a tiny run writes a sane doc, tables and plots.

Only the smoke run reads the shared CIFAR-10 data and skips without it; the helpers' tests
(Wilson interval, config strictness, path remapping) always run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import SHARED_DATA, needs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_wilson_interval_contains_estimate() -> None:
    from reproduce_lib import wilson

    for k, n in [(0, 10), (5, 10), (10, 10), (855, 932)]:
        lo, hi = wilson(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0
    lo, hi = wilson(855, 932)
    assert hi - lo < 0.04


def test_repro_config_is_strict(tmp_path: Path) -> None:
    from reproduce_lib import load_repro_config

    cfg = load_repro_config(ROOT / "configs" / "reproduce_cifar10.yaml")
    assert cfg.experiments[0].variants[0] == "hawq"
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: [{name: a, title: b, config: c, variantz: [hawq]}]\n")
    with pytest.raises(ValueError, match="variantz"):
        load_repro_config(bad)


@needs("cifar10_subset.npz", "resnet20-12fca82f.th")
def test_smoke_run_writes_doc(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reproduce_cifar10.py"), "--smoke",
         "--out", str(tmp_path), "--data-root", str(SHARED_DATA)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = (tmp_path / "results.md").read_text()
    assert "SMOKE RUN" in doc and "## Acceptance" in doc
    pngs = sorted(p.name for p in (tmp_path / "img").glob("*.png"))
    assert pngs == ["resnet20_cifar10_acc_vs_size.png", "resnet20_cifar10_order_curves.png"]
    assert all((tmp_path / "img" / p).stat().st_size > 1000 for p in pngs)
    # Table 1 rows of this run: "| label | W | A | 13.xx | 8.00x | size | acc [lo, hi] | ptq |"
    rows = re.findall(
        r"^\| (HAWQ \(Hessian allocation\)|uniform 2-bit) \|[^|]*\| 4 \| ([\d.]+)x \| ([\d.]+)x "
        r"\| ([\d.]+) \| ([\d.]+) \[([\d.]+), ([\d.]+)\] \| ([\d.]+) \|$",
        doc,
        flags=re.M,
    )
    assert {r[0] for r in rows} == {"HAWQ (Hessian allocation)", "uniform 2-bit"}
    for label, wcomp, acomp, size, acc, lo, hi, ptq in rows:
        assert 0.0 <= float(lo) <= float(acc) <= float(hi) <= 100.0
        assert 0.0 <= float(ptq) <= 100.0
        assert float(acomp) == pytest.approx(8.0)
        assert 0.0 < float(size) < 1.04
        if label.startswith("HAWQ"):
            assert 12.0 <= float(wcomp) <= 13.5  # target 13.11x, v1 stays under the size limit
    assert "Omega descending (HAWQ)" in doc and "reverse Omega" in doc


def test_data_root_overrides_remap_shared_paths() -> None:
    from types import SimpleNamespace as NS

    from reproduce_cifar10 import data_root_overrides

    cfg = NS(
        model=NS(checkpoint="../shared/data/cifar10/r20.th"),
        data=NS(name="cifar10", path="../shared/data/cifar10/sub.npz"),
    )
    assert data_root_overrides(cfg, None) == []
    assert data_root_overrides(cfg, "/d") == [
        "model.checkpoint=/d/cifar10/r20.th",
        "data.path=/d/cifar10/sub.npz",
    ]
    fm = NS(model=NS(checkpoint=None), data=NS(name="fashion_mnist", path=None))
    assert data_root_overrides(fm, "/d") == ["data.path=/d/fashion-mnist"]


def test_gpu_config_loads() -> None:
    from reproduce_lib import load_repro_config

    cfg = load_repro_config(ROOT / "configs" / "reproduce_cifar10_gpu.yaml")
    assert [e.name for e in cfg.experiments][0] == "resnet20_cifar10"
    assert "GPU" in cfg.note
