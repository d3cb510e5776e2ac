"""The ``hawq`` CLI on a finished tiny run: run (all skipped), status, report tables + PNGs,
export (integer codes x scales reproduce the fine-tuned model's quantized weights)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_run import copy_of_finished_run, finished_run

from hawq.quant import quantize_weight
from pipeline.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_dir(tmp_path: Path, tmp_path_factory) -> Path:
    return copy_of_finished_run(tmp_path_factory, tmp_path / "run")


def test_run_again_skips_everything(run_dir: Path, tmp_path_factory, capsys) -> None:
    cfg = finished_run(tmp_path_factory).parent / "tiny.yaml"
    capsys.readouterr()
    assert main(["-q", "run", str(cfg), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines()[3:10]]
    assert [ln[:2] for ln in lines] == [
        [s, "skip"]
        for s in ("baseline", "hessian", "allocate", "order", "finetune", "evaluate", "export")
    ]
    assert f"Next: hawq report {run_dir}" in out


def test_status_of_finished_run(run_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["-q", "status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "all stages done" in out
    assert "2/2 epochs" in out and "3/3 blocks" in out and "6/6 epochs" in out
    assert out.count(" done ") == 7


def test_report_tables_and_plots(run_dir: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    out_dir = tmp_path / "plots"
    assert main(["-q", "report", str(run_dir), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    for title in ("Per-block Hessian sensitivity", "Allocation", "Accuracy per phase"):
        assert title in out
    sens = pq.read_table(run_dir / "stages/hessian/sensitivity.parquet").to_pylist()
    bits = {
        r["block"]: r["bits"]
        for r in pq.read_table(run_dir / "stages/allocate/bits.parquet").to_pylist()
    }
    for row in sens:  # one line per block with its eigenvalue and bits
        line = next(ln for ln in out.splitlines() if ln.startswith(row["block"] + " "))
        assert f"{row['eigenvalue']:.4g}" in line and f" {bits[row['block']]} " in line
    final = pq.read_table(run_dir / "stages/evaluate/metrics.parquet").to_pylist()[-1]
    assert final["phase"] == "final" and f"{final['eval_acc']:.4g}" in out
    for name in ("sensitivity.png", "bits.png", "pareto.png", "accuracy.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]


def test_export_integer_weights(run_dir: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "exported"
    capsys.readouterr()
    assert main(["-q", "export", str(run_dir), "--out", str(dest)]) == 0
    assert "Exported layers" in capsys.readouterr().out
    assert sorted(p.name for p in dest.iterdir()) == [
        "bit_config.yaml",
        "layers.parquet",
        "model_int.safetensors",
    ]
    bit_config = yaml.safe_load((dest / "bit_config.yaml").read_text())
    alloc = pq.read_table(run_dir / "stages/allocate/bits.parquet").to_pylist()
    with safe_open(str(run_dir / "stages/finetune/model.safetensors"), "pt") as f:
        tuned = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(dest / "model_int.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "hawq.export/1"
        for row in alloc:
            (layer,) = row["modules"]
            b = row["bits"]
            assert bit_config["layers"][layer]["weight"] == b
            codes = f.get_tensor(f"{layer}.weight_int")
            scale = f.get_tensor(f"{layer}.weight_scale")
            assert int(f.get_tensor(f"{layer}.weight_bits")) == b
            qmax = 2 ** (b - 1) - 1
            assert codes.abs().max() <= qmax and codes.dtype == torch.int8
            # ground truth: the symmetric per-channel quantizer applied to the tuned weights
            expect = quantize_weight(tuned[f"{layer}.weight"], b, per_channel=True)
            assert torch.allclose(codes.float() * scale[:, None], expect, rtol=0, atol=1e-6)
            assert torch.equal(f.get_tensor(f"{layer}.bias"), tuned[f"{layer}.bias"])
